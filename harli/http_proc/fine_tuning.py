"""OpenAI's fine-tuning API on the daemon's job store: ``POST /v1/fine_tuning/jobs``,
``GET /v1/fine_tuning/jobs`` (newest first, ``after``/``limit``), ``GET …/{id}``,
``POST …/{id}/cancel``, ``…/pause``, ``…/resume``, ``GET …/{id}/events`` and
``GET …/{id}/checkpoints``.

Every job is a job of the daemon's store, attached and steered through its control API, so
``harli jobs`` and this API see the same jobs. A job belongs to the API key that made it:
another key gets 404, as for a job that does not exist. The shapes are in
``fine_tuning_objects.py``.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from fastapi import APIRouter

from harli.http_proc.deps import HttpState, Owner, State
from harli.http_proc.errors import ApiError, bad_field
from harli.http_proc.files import owned_file
from harli.http_proc.fine_tuning_objects import (
    FineTuningJobRequest,
    build_spec,
    checkpoint_object,
    event_objects,
    job_id_of,
    job_name,
    job_object,
    public_job_id,
)
from harli.http_proc.json_text import TextJsonRoute
from harli.http_proc.pages import check_limit, page
from harli.ipc.control import (
    AttachJob,
    CancelJob,
    CheckpointList,
    FileInfo,
    JobCheckpoints,
    JobDetail,
    JobEvent,
    JobInfo,
    JobList,
    JobLogs,
    JobMetric,
    ListJobs,
    PauseJob,
    ResumeJob,
)

router = APIRouter(route_class=TextJsonRoute)

MAX_LIMIT = 100  # the most objects one page of jobs, events or checkpoints holds
_LAST_ID = 2**63 - 1
FINE_TUNE = "fine-tune"


def no_such_job(public_id: str) -> ApiError:
    return ApiError(404, f"No fine-tuning job found with id {public_id}",
                    param="fine_tuning_job_id", code="fine_tuning_job_not_found")


async def owned_job(state: HttpState, owner: str, public_id: str) -> JobInfo:
    """The job, if ``owner`` made it; 404 otherwise."""
    job_id = job_id_of(public_id)
    if job_id is None:
        raise no_such_job(public_id)
    try:
        # A page of its log after the last possible ids: the job alone, no events.
        detail = await state.link.call(JobLogs(job_id=job_id, after_event=_LAST_ID,
                                               after_metric=_LAST_ID, limit=1), JobDetail)
    except ApiError as e:
        if e.status == 404:
            raise no_such_job(public_id) from None
        raise
    if detail.job.owner != owner:
        raise no_such_job(public_id)
    return detail.job


async def _all_logs(state: HttpState, job_id: int) -> JobDetail:
    """Every event and metric event of a job, page by page (its ``job`` as of the last)."""
    events: list[JobEvent] = []
    metrics: list[JobMetric] = []
    while True:
        page = await state.link.call(JobLogs(
            job_id=job_id, after_event=events[-1].event_id if events else 0,
            after_metric=metrics[-1].metric_id if metrics else 0), JobDetail)
        events += page.events
        metrics += page.metrics
        if not page.truncated:
            return JobDetail(job=page.job, events=events, metrics=metrics)


def _object(state: HttpState, job: JobInfo) -> dict[str, Any]:
    return job_object(job, state.link.base_model, state.cfg.files_dir, time.time())


async def _check_model(state: HttpState, model: str) -> None:
    if model == state.link.base_model:
        return
    adapters = {m.name for m in await state.link.models() if m.kind == "adapter"}
    if model in adapters:
        raise bad_field("model", f"`{model}` is a fine-tuned model; a job trains on the "
                                 f"served base model `{state.link.base_model}`")
    raise ApiError(404, f"The model `{model}` does not exist; fine-tuning trains on the "
                        f"served base model `{state.link.base_model}`", param="model",
                   code="model_not_found")


async def _dataset(state: HttpState, owner: str, file_id: str, param: str) -> FileInfo:
    found = await owned_file(state, owner, file_id, param)
    if found.purpose != FINE_TUNE:
        raise bad_field(param, f"{file_id} was uploaded with purpose {found.purpose!r}, not "
                               f"{FINE_TUNE!r}")
    return found


@router.post("/v1/fine_tuning/jobs")
async def create_job(req: FineTuningJobRequest, state: State, owner: Owner) -> Any:
    unsupported = req.unsupported()
    if unsupported:
        raise bad_field(*unsupported[0])
    await _check_model(state, req.model)
    training = await _dataset(state, owner, req.training_file, "training_file")
    validation = (await _dataset(state, owner, req.validation_file, "validation_file")
                  if req.validation_file else None)
    spec = build_spec(req, job_name(req.suffix, state.link.base_model, secrets.token_hex(4)),
                      training.path, validation.path if validation else "")
    try:
        job = await state.link.call(AttachJob(spec=spec, owner=owner), JobInfo)
    except ApiError as e:
        # The daemon's check names the files by path: the client knows them by id.
        e.message = e.message.replace(training.path, req.training_file)
        if validation is not None and req.validation_file:
            e.message = e.message.replace(validation.path, req.validation_file)
        if e.status == 400 and e.param is None:
            e.param = ("validation_file" if e.message.startswith("validation_file")
                       else "training_file" if req.training_file in e.message else None)
        raise
    return _object(state, job)


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(state: State, owner: Owner, after: str | None = None,
                    limit: int = 20) -> Any:
    check_limit(limit, MAX_LIMIT)
    jobs = (await state.link.call(ListJobs(owner=owner), JobList)).jobs
    jobs.reverse()  # newest first
    if after is not None:
        before = job_id_of(after)
        if before is None:
            raise bad_field("after", f"Invalid value for 'after': {after!r}; expected a "
                                     f"fine-tuning job id (ftjob-N)")
        jobs = [j for j in jobs if j.job_id < before]
    return page(jobs, lambda j: public_job_id(j.job_id), None, limit,
                lambda j: _object(state, j))


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve_job(state: State, owner: Owner, job_id: str) -> Any:
    return _object(state, await owned_job(state, owner, job_id))


async def _steer(state: HttpState, owner: str, job_id: str,
                 steer: type[CancelJob | PauseJob | ResumeJob]) -> Any:
    job = await owned_job(state, owner, job_id)
    return _object(state, await state.link.call(steer(job_id=job.job_id), JobInfo))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(state: State, owner: Owner, job_id: str) -> Any:
    """A queued or held job is cancelled at once; a running one stops at its next
    micro-step boundary (its status says ``running`` until then)."""
    return await _steer(state, owner, job_id, CancelJob)


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
async def pause_job(state: State, owner: Owner, job_id: str) -> Any:
    """A queued job is paused at once; a running one stops after a checkpoint at its next
    step boundary (its status says ``running`` until then)."""
    return await _steer(state, owner, job_id, PauseJob)


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
async def resume_job(state: State, owner: Owner, job_id: str) -> Any:
    return await _steer(state, owner, job_id, ResumeJob)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(state: State, owner: Owner, job_id: str, after: str | None = None,
                     limit: int = 20) -> Any:
    check_limit(limit, MAX_LIMIT)
    job = await owned_job(state, owner, job_id)
    log = await _all_logs(state, job.job_id)
    events = event_objects(log.events, log.metrics, log.job.total_steps)
    return page(events, lambda e: str(e["id"]), after, limit, lambda e: e)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def job_checkpoints(state: State, owner: Owner, job_id: str, after: str | None = None,
                          limit: int = 10) -> Any:
    check_limit(limit, MAX_LIMIT)
    job = await owned_job(state, owner, job_id)
    found = (await state.link.call(JobCheckpoints(job_id=job.job_id),
                                   CheckpointList)).checkpoints
    found.reverse()  # newest first
    return page(found, lambda c: f"ftckpt-{job.job_id}-{c.step}", after, limit,
                lambda c: checkpoint_object(job.job_id, c))
