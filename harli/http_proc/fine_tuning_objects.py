"""OpenAI's fine-tuning shapes and Harli's jobs, both ways: a ``POST /v1/fine_tuning/jobs``
body into a ``JobSpec``, and a job, its log and its checkpoints into ``fine_tuning.job``,
``fine_tuning.job.event`` and ``fine_tuning.job.checkpoint`` objects. Pure: no daemon, no I/O.

A job's id is ``ftjob-<job id>``. Its ``fine_tuned_model`` is the job's name, under which the
daemon serves its adapter once it succeeds (OpenAI's ``ft:model:org:suffix:id`` holds colons,
which no served model name may). Harli's own job options travel under the ``harli`` key of
the body (``extra_body={"harli": {...}}`` in the SDK): any ``JobSpec`` field but those the
OpenAI fields set. Statuses are OpenAI's; a held job (paused by a user) is ``paused``, and a
running job that the quota gives no compute for now is ``running``. A job is created
``validating_files`` while the daemon checks and tokenizes its files in the background (where
that stands is under ``harli.validation``), then ``queued``, or ``failed`` with OpenAI's
``invalid_training_file`` / ``invalid_validation_file`` error naming the file and line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from harli.datasets import UPLOAD_SUFFIX
from harli.http_proc.errors import bad_field
from harli.ipc.control import (
    CheckpointInfo,
    JobEvent,
    JobInfo,
    JobMetric,
    TrainMetric,
    ValidMetric,
)
from harli.ipc.jobs import JobSpec

JOB_PREFIX = "ftjob-"
HARLI_KEY = "harli"
ORGANIZATION = "harli"
# Harli's status -> OpenAI's.
_STATUS = {"validating_files": "validating_files", "queued": "queued", "running": "running",
           "paused": "running", "held": "paused", "succeeded": "succeeded", "failed": "failed",
           "cancelled": "cancelled"}
_ENDED = ("succeeded", "failed", "cancelled")
# JobSpec fields the OpenAI fields set, so the ``harli`` key may not: -> the field that does.
_SET_BY = {"name": "suffix", "dataset": "training_file", "validation_file": "validation_file",
           "base_model": "model"}
_DEFAULTS = JobSpec(name="x", dataset="/x")
_JOB_ID = re.compile(rf"{re.escape(JOB_PREFIX)}([1-9][0-9]{{0,17}})")  # job ids are int64
_FILE_NAME = re.compile(rf"^file-[A-Za-z0-9]+{re.escape(UPLOAD_SUFFIX)}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1)] | None = None
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1)] | None = None
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0)] | None = None


class SupervisedMethod(_Strict):
    hyperparameters: Hyperparameters | None = None


class Method(_Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class FineTuningJobRequest(_Strict):
    """``POST /v1/fine_tuning/jobs``."""

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: Annotated[str, Field(min_length=1, max_length=64,
                                 pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    harli: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for each field set to something this server does not do."""
        out = []
        if self.method is not None and self.method.type != "supervised":
            out.append(("method.type", f"only supervised fine-tuning is supported, not "
                                       f"{self.method.type}"))
        if self.integrations:
            out.append(("integrations", "integrations are not supported by this server"))
        if self.metadata:
            out.append(("metadata", "metadata is not supported by this server"))
        if self.hyperparameters is not None and self.method is not None \
                and self.method.supervised is not None \
                and self.method.supervised.hyperparameters is not None:
            out.append(("hyperparameters", "give hyperparameters either at the top level or "
                                           "under method.supervised, not both"))
        return out

    def hyper(self) -> Hyperparameters:
        if self.hyperparameters is not None:
            return self.hyperparameters
        if self.method is not None and self.method.supervised is not None \
                and self.method.supervised.hyperparameters is not None:
            return self.method.supervised.hyperparameters
        return Hyperparameters()


def public_job_id(job_id: int) -> str:
    return f"{JOB_PREFIX}{job_id}"


def job_id_of(public: str) -> int | None:
    """``ftjob-12`` -> 12; None for anything else: only the id as ``public_job_id`` writes
    it (ASCII digits, no leading zero), so no other string names the same job (``str.isdigit``
    takes "²", on which ``int`` raises, and "١٢", which ``int`` reads as 12)."""
    m = _JOB_ID.fullmatch(public)
    return int(m.group(1)) if m else None


def openai_status(status: str) -> str:
    return _STATUS.get(status, status)


def job_name(suffix: str | None, base_model: str, token: str) -> str:
    """``ft-<suffix or the base model's name>-<token>``, a valid job (and model) name."""
    stem = suffix or re.sub(r"[^A-Za-z0-9._-]+", "-", base_model).strip("-._") or "model"
    return f"ft-{stem[:64]}-{token}"


def build_spec(req: FineTuningJobRequest, name: str, dataset: str,
               validation_file: str = "") -> JobSpec:
    """The job the request asks for; a 400 naming the field at fault (``harli.<key>`` for
    Harli's own options)."""
    hp = req.hyper()
    fields: dict[str, Any] = {"name": name, "dataset": dataset,
                              "validation_file": validation_file}
    from_openai: dict[str, str] = {}  # JobSpec field -> the request's field that set it
    if isinstance(hp.n_epochs, int):
        fields["epochs"], from_openai["epochs"] = hp.n_epochs, "hyperparameters.n_epochs"
    if isinstance(hp.batch_size, int):
        fields["micro_batch_size"] = hp.batch_size
        from_openai["micro_batch_size"] = "hyperparameters.batch_size"
    if isinstance(hp.learning_rate_multiplier, float | int):
        fields["learning_rate"] = _DEFAULTS.learning_rate * hp.learning_rate_multiplier
        from_openai["learning_rate"] = "hyperparameters.learning_rate_multiplier"
    if req.seed is not None:
        fields["seed"], from_openai["seed"] = req.seed, "seed"
    for key, value in (req.harli or {}).items():
        if key in _SET_BY:
            raise bad_field(f"{HARLI_KEY}.{key}", f"{HARLI_KEY}.{key} cannot be set: the "
                                                  f"request's `{_SET_BY[key]}` sets it")
        if key in from_openai:
            raise bad_field(f"{HARLI_KEY}.{key}", f"{HARLI_KEY}.{key} and "
                                                  f"{from_openai[key]} both set it; give one")
        fields[key] = value
    try:
        return msgspec.convert(fields, JobSpec)
    except msgspec.ValidationError as e:
        param = _param_of(str(e), req.harli or {}, from_openai)
        if "unknown field" in str(e):
            raise bad_field(param, f"Unrecognized job option: {param}") from None
        why = re.sub(r" - at `\$[^`]*`$", "", str(e))
        raise bad_field(param, f"Invalid value for '{param}': {why}") from None


def _param_of(message: str, harli: dict[str, Any], from_openai: dict[str, str]) -> str:
    """The request's field a msgspec error is about (``... - at `$.lora.r` ``, or ``Object
    contains unknown field `x` ``)."""
    m = re.search(r"`\$\.([\w.\[\]]+)`", message) or re.search(r"unknown field `(\w+)`",
                                                                message)
    path = m.group(1) if m else ""
    key = path.split(".")[0].split("[")[0]
    if key in from_openai:
        return from_openai[key]
    return f"{HARLI_KEY}.{path}" if key in harli or not key else path


def file_ref(path: str, files_dir: Path) -> str | None:
    """The file id of an uploaded file's path; another path (a job the CLI attached) as it
    is; None for none."""
    if not path:
        return None
    p = Path(path)
    if p.parent == files_dir and _FILE_NAME.match(p.name):
        return p.name[:-len(UPLOAD_SUFFIX)]
    return path


def _hyperparameters(spec: JobSpec) -> dict[str, Any]:
    return {"n_epochs": spec.epochs, "batch_size": spec.micro_batch_size,
            "learning_rate_multiplier": spec.learning_rate / _DEFAULTS.learning_rate}


def _estimated_finish(job: JobInfo, now: float) -> int | None:
    """Now plus the remaining steps at the pace of those done so far (restarts and pauses
    counted in the pace); None before a step is done or once it is not running."""
    if job.status not in ("running", "paused") or not job.started_s or job.step <= 0 \
            or not job.total_steps:
        return None
    pace_s = (now - job.started_s) / job.step
    return int(now + pace_s * max(0, job.total_steps - job.step))


def job_object(job: JobInfo, base_model: str, files_dir: Path, now: float) -> dict[str, Any]:
    """The ``fine_tuning.job`` object of ``job``, and Harli's view of it under ``harli``."""
    spec = job.spec
    hp = _hyperparameters(spec)
    return {
        "id": public_job_id(job.job_id), "object": "fine_tuning.job",
        "created_at": int(job.created_s),
        "finished_at": int(job.finished_s) if job.finished_s is not None else None,
        "model": base_model,
        "fine_tuned_model": job.fine_tuned_model if job.status == "succeeded" else None,
        "organization_id": ORGANIZATION, "status": openai_status(job.status),
        "hyperparameters": hp,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "training_file": file_ref(spec.dataset, files_dir) or spec.dataset,
        "validation_file": file_ref(spec.validation_file, files_dir),
        "result_files": [],
        "trained_tokens": job.tokens if job.status in _ENDED else None,
        "error": _error(job),
        "seed": spec.seed, "estimated_finish": _estimated_finish(job, now),
        "integrations": [], "metadata": None,
        HARLI_KEY: {"name": job.name, "status": job.status, "step": job.step,
                    "total_steps": job.total_steps, "loss": job.loss,
                    "valid_loss": job.valid_loss, "valid_accuracy": job.valid_accuracy,
                    "checkpoint_step": job.checkpoint_step, "tokens": job.tokens,
                    "tokens_per_s": job.tokens_per_s, "level": job.level,
                    "restarts": job.restarts, "spec": msgspec.to_builtins(spec),
                    "validation": msgspec.to_builtins(job.validation)
                    if job.validation is not None else None},
    }


def _error(job: JobInfo) -> dict[str, Any] | None:
    """OpenAI's error of a failed job: a job that failed before it ever ran failed the check
    of its files, and names the one at fault."""
    if job.status != "failed":
        return None
    message = job.error or "failed"
    if job.started_s is None:
        param = "validation_file" if message.startswith("validation_file") else "training_file"
        return {"code": f"invalid_{param}", "message": message, "param": param}
    return {"code": "job_failed", "message": message, "param": None}


def _level(e: JobEvent) -> str:
    if e.kind == "failed":
        return "error"
    if e.kind == "requeued" or e.message.startswith("not served"):
        return "warn"
    return "info"


def _event_object(e: JobEvent | JobMetric, total_steps: int | None) -> dict[str, Any]:
    common = {"object": "fine_tuning.job.event", "created_at": int(e.time_s), "level": "info"}
    if isinstance(e, JobEvent):
        return {**common, "id": f"ftevent-{e.event_id}", "level": _level(e),
                "message": e.message, "data": {"kind": e.kind}, "type": "message"}
    of = f"/{total_steps}" if total_steps else ""
    if isinstance(e, TrainMetric):
        loss = "-" if e.train_loss is None else f"{e.train_loss:.4f}"
        return {**common, "id": f"ftevent-m{e.metric_id}", "type": "metrics",
                "message": f"Step {e.step}{of}: training loss={loss}",
                "data": {"step": e.step, "total_steps": total_steps,
                         "train_loss": e.train_loss, "learning_rate": e.learning_rate,
                         "grad_norm": e.grad_norm, "epoch": e.epoch, "tokens": e.tokens,
                         "tokens_per_s": e.tokens_per_s, "level": e.level}}
    assert isinstance(e, ValidMetric)
    return {**common, "id": f"ftevent-m{e.metric_id}", "type": "metrics",
            "message": f"Step {e.step}{of}: validation loss={e.valid_loss:.4f}, token "
                       f"accuracy={e.valid_accuracy:.4f}",
            "data": {"step": e.step, "total_steps": total_steps, "valid_loss": e.valid_loss,
                     "valid_mean_token_accuracy": e.valid_accuracy, "epoch": e.epoch,
                     "examples": e.examples, "tokens": e.tokens}}


def event_objects(events: Sequence[JobEvent], metrics: Sequence[JobMetric],
                  total_steps: int | None) -> list[dict[str, Any]]:
    """A job's events and metric events as ``fine_tuning.job.event`` objects, newest first
    (by the time the daemon stored each; ties: metric events before messages, then by id)."""
    entries: list[JobEvent | JobMetric] = [*events, *metrics]
    entries.sort(key=lambda e: (e.time_s, not isinstance(e, JobEvent),
                                e.event_id if isinstance(e, JobEvent) else e.metric_id),
                 reverse=True)
    return [_event_object(e, total_steps) for e in entries]


def checkpoint_object(job_id: int, c: CheckpointInfo) -> dict[str, Any]:
    """A ``fine_tuning.job.checkpoint``. Its ``fine_tuned_model_checkpoint`` is the model name
    it is served under when published (``NAME@step-N``), else its directory, which
    ``POST /v1/load_lora_adapter`` takes as ``lora_path``."""
    return {"id": f"ftckpt-{job_id}-{c.step}", "object": "fine_tuning.job.checkpoint",
            "created_at": int(c.created_s),
            "fine_tuned_model_checkpoint": c.served_as or c.path,
            "fine_tuning_job_id": public_job_id(job_id), "step_number": c.step,
            "metrics": {"step": c.step, "train_loss": c.train_loss,
                        "valid_loss": c.valid_loss,
                        "valid_mean_token_accuracy": c.valid_accuracy},
            HARLI_KEY: {"path": c.path, "served_as": c.served_as}}
