"""``JobManager``: the daemon's finetune jobs. It answers the job requests of the control API
(attach, list, show, cancel, pause, resume, logs, checkpoints) and the uploaded files' (add,
list, show, delete), keeps the job store, feeds the finetune process one job at a time
(highest priority, then oldest), records what the process reports of each job, and requeues
the running job when the process dies so that it resumes from its last checkpoint. The quota
decision is the ``QuotaController``'s; a job is handed over running or paused as it says.

A user's pause holds a job (``held``) until it is resumed: a queued one is simply not
scheduled; a running one is told to stop after writing a checkpoint at a step boundary
(``StopJob(keep_progress=True)``), ends ``stopped``, and is held then, or queued again when a
resume came meanwhile.

No sockets here: the daemon passes messages in and gives it a ``send`` callable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

import msgspec

from harli.config import HarliConfig
from harli.daemon import jobstore as js
from harli.daemon.attach import AttachRefused, AttachValidator
from harli.daemon.file_store import FileRefused, FileStore
from harli.daemon.jobstore import JobStore
from harli.daemon.metrics import Metrics
from harli.daemon.quota import QuotaController
from harli.daemon.supervisor import ChildExited, describe_returncode
from harli.daemon.validation import DatasetValidations, StageEnded
from harli.datasets import TokenizedCache
from harli.ipc.control import (
    AddFile,
    AttachJob,
    CancelJob,
    CheckpointList,
    ControlReply,
    DeleteFile,
    FileInfo,
    FileList,
    JobCheckpoints,
    JobDetail,
    JobInfo,
    JobList,
    JobLogs,
    ListFiles,
    ListJobs,
    PauseJob,
    ResumeJob,
    ShowFile,
    ShowJob,
    ValidationStatus,
)
from harli.ipc.finetune import (
    STOPPED,
    CheckpointSaved,
    DaemonToFinetune,
    FinetuneFatal,
    JobEnded,
    JobStarted,
    MicroStepReport,
    StartJob,
    StepLogged,
    StopJob,
)
from harli.ipc.inference import Error, ErrorCode
from harli.ipc.jobs import JobSpec
from harli.ipc.validation import (
    CheckFile,
    ValidateJob,
    ValidationDone,
    ValidationFailed,
    ValidationProgress,
)

logger = logging.getLogger(__name__)

Reply = ControlReply | Error
_TPS_ALPHA = 0.2  # EWMA weight of the newest micro-step in tokens/s
# What ``show_job`` returns of a job's log: its newest events and metric events (``job_logs``
# pages through all of them).
SHOW_EVENTS = 20
SHOW_METRICS = 100
# Jobs whose files are checked at once, each in a worker process: a large file being checked
# delays no other job's.
VALIDATION_WORKERS = 4


class JobManager:
    def __init__(self, cfg: HarliConfig, send: Callable[[DaemonToFinetune], bool],
                 metrics: Metrics, quota: QuotaController, *,
                 may_start_job: Callable[[], bool] = lambda: True) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.send = send
        self.quota = quota
        self.store = JobStore(cfg.state_dir / "jobs.sqlite")
        self.files = FileStore(self.store.db, cfg.files_dir)
        self.files.sweep()  # before the HTTP front runs: nothing of it is in flight
        self.dataset_cache = TokenizedCache(cfg.dataset_cache_dir)
        self.validator = AttachValidator(
            cfg.model_path, cfg.output_roots,
            cfg.lora.max_lora_rank if cfg.lora.enabled else None)
        self.validations = DatasetValidations(VALIDATION_WORKERS)
        self.accepting = True  # False once the daemon drains: attaches are refused
        self.finetune_ready = False
        self.running: int | None = None  # job id handed to the finetune process
        # Running jobs told to stop for a pause, until they end: held then (or queued again,
        # for one resumed meanwhile, which leaves this set).
        self._pausing: set[int] = set()
        # The names served now (the daemon's model catalog): a published checkpoint's.
        self.served_names: Callable[[], Collection[str]] = lambda: ()
        self._tps: dict[int, float] = {}
        # Set when the queue or the finetune's readiness may have changed, so the daemon loop
        # looks at SQLite only then, not on every turn.
        self._queue_changed = True
        # A job starts only while this says yes (CUDA hosts sharing decode's weights: once the
        # finetune holds them, see WeightsRelay.may_start_job).
        self.may_start_job = may_start_job
        for job_id in self.store.requeue_active("daemon restarted; resumes from its last "
                                                "checkpoint"):
            logger.info("[jobs] job %d was running when the daemon stopped; requeued", job_id)
        for job in self.store.validating():
            self.store.add_event(job.job_id, "validating", "the daemon restarted while its "
                                 "files were checked; checking them again")
            self._validate(job.job_id, job.spec)
        self._prune_dataset_cache()

    def close(self) -> None:
        self.validations.close()  # jobs being checked stay validating_files: checked again
        self.store.close()

    def stop_accepting(self) -> None:
        """The daemon drains: attaches are refused (``shutting_down``) from now on."""
        self.accepting = False

    # -- control API -------------------------------------------------------------------------

    def attach(self, msg: AttachJob) -> Reply:
        """Store ``msg``'s job at once, ``validating_files``, after the checks that need no
        file read (``AttachValidator``); its files are checked in the background
        (``DatasetValidations``), and it becomes ``queued``, or ``failed`` naming the file and
        line at fault, in ``poll_validations``."""
        if not self.accepting:
            return Error(request_id=None, code=ErrorCode.SHUTTING_DOWN,
                         message="the daemon is shutting down; attach the job again once it "
                                 "has restarted")
        spec = msg.spec
        if not spec.output_dir:
            spec = msgspec.structs.replace(spec, output_dir=str(self.cfg.output_roots[0] /
                                                                spec.name))
        jobs = self.store.all_jobs()
        if spec.name in {j.name for j in jobs}:
            return Error(request_id=None, code=ErrorCode.INVALID,
                         message=f"a job named {spec.name!r} exists already; choose another "
                                 f"name")
        taken = {j.spec.output_dir: j.spec.name for j in jobs if j.status not in js.TERMINAL}
        try:
            self.validator.check(spec, taken)
        except AttachRefused as e:
            return Error(request_id=None, code=ErrorCode.INVALID, message=str(e))
        try:
            job = self.store.add(spec, None, msg.owner)
        except js.DuplicateJobName:
            return Error(request_id=None, code=ErrorCode.INVALID,
                         message=f"a job named {spec.name!r} exists already")
        logger.info("[jobs] attached job %d %r; validating its files", job.job_id, spec.name)
        self._validate(job.job_id, spec)
        return self._with_validation(job)

    def _validate(self, job_id: int, spec: JobSpec) -> None:
        limits = self.cfg.finetune
        files = [CheckFile(key="dataset", path=spec.dataset)]
        if spec.validation_file:
            files.append(CheckFile(key="validation_file", path=spec.validation_file))
        self.validations.submit(ValidateJob(
            job_id=job_id, files=files, max_seq_len=spec.max_seq_len,
            model_dir=str(self.cfg.model_path), cache_dir=str(self.cfg.dataset_cache_dir),
            max_bytes=limits.max_dataset_bytes, max_line_bytes=limits.max_line_bytes,
            max_records=limits.max_dataset_records))

    def poll_validations(self) -> None:
        """On the daemon's loop: the validations' stages (an event when one begins, and one
        with its speed when a file's structure has been checked) and outcomes (the job queued
        or failed). A failure handling one job's report is logged and counted, and fails that
        job alone."""
        if not len(self.validations):
            return
        for job_id, report, ended in self.validations.poll():
            try:
                self._on_validation(job_id, report, ended)
            except Exception as e:
                logger.exception("[jobs] job %d: recording its validation failed", job_id)
                self.metrics.contained_errors.labels("validation").inc()
                self.store.set_status(job_id, js.FAILED, "failed",
                                      f"failed: recording its validation failed: {e!r}",
                                      error=f"internal error: {e!r}")

    def _on_validation(self, job_id: int,
                       report: ValidationProgress | ValidationDone | ValidationFailed,
                       ended: StageEnded | None) -> None:
        if ended is not None and ended.progress.stage == "checking" \
                and not isinstance(report, ValidationFailed):
            p = ended.progress
            self.store.add_event(job_id, "validating",
                                 f"checked {p.key}: {_megabytes(p.bytes_total)} in "
                                 f"{ended.seconds:.1f} s "
                                 f"({p.bytes_total / max(ended.seconds, 1e-9) / 1e6:.0f} MB/s)")
        if isinstance(report, ValidationProgress):
            self.store.add_event(job_id, "validating", f"{report.stage} {report.key} "
                                 f"({_megabytes(report.bytes_total)})")
            return
        job = self.store.get(job_id)
        if job is None or job.status != js.VALIDATING:
            return  # cancelled meanwhile
        if isinstance(report, ValidationFailed):
            logger.info("[jobs] job %d %r failed validation: %s", job_id, job.name, report.error)
            self.store.set_status(job_id, js.FAILED, "failed",
                                  f"failed validation: {report.error}", error=report.error)
            return
        self.store.set_validated(job_id, job.spec, dict(report.report))
        logger.info("[jobs] job %d %r validated; queued", job_id, job.name)
        self._queue_changed = True

    def _with_validation(self, job: JobInfo) -> JobInfo:
        """``job`` with where its files' check stands, while it is ``validating_files``."""
        if job.status != js.VALIDATING:
            return job
        p = self.validations.progress(job.job_id)
        state = ValidationStatus(stage="waiting") if p is None else ValidationStatus(
            file=p.key, stage=p.stage, bytes_done=p.bytes_done, bytes_total=p.bytes_total,
            records=p.records)
        if self.validations.held:  # stopped while decode is busy and the quota at level 0
            state = msgspec.structs.replace(state, stage="held")
        return msgspec.structs.replace(job, validation=state)

    def list_jobs(self, msg: ListJobs) -> JobList:
        return JobList(jobs=[self._with_validation(j) for j in self.store.all_jobs(msg.owner)])

    def show(self, msg: ShowJob) -> Reply:
        job = self._job(msg.job_id)
        if isinstance(job, Error):
            return job
        return JobDetail(job=job, events=self.store.events(job.job_id)[-SHOW_EVENTS:],
                         metrics=self.store.last_metrics(job.job_id, SHOW_METRICS))

    def logs(self, msg: JobLogs) -> Reply:
        job = self._job(msg.job_id)
        if isinstance(job, Error):
            return job
        # One more than asked for tells whether there is more, without another query.
        events = self.store.events(job.job_id, msg.after_event, msg.limit + 1)
        metrics = self.store.metrics(job.job_id, msg.after_metric, msg.limit + 1)
        return JobDetail(job=job, events=events[:msg.limit], metrics=metrics[:msg.limit],
                         truncated=len(events) > msg.limit or len(metrics) > msg.limit)

    def cancel(self, msg: CancelJob) -> Reply:
        job = self._job(msg.job_id)
        if isinstance(job, Error) or job.status in js.TERMINAL:
            return job
        if job.status == js.VALIDATING:
            self.validations.cancel(job.job_id)
            self.store.set_status(job.job_id, js.CANCELLED, "cancelled",
                                  "cancelled while its files were checked")
        elif job.job_id == self.running:
            self._pausing.discard(job.job_id)  # a cancel outranks a pause under way
            self.send(StopJob(job_id=job.job_id, reason="cancelled"))
            self.store.add_event(job.job_id, "cancel", "cancel requested; stops at the next "
                                 "micro-step boundary")
        else:
            self.store.set_status(job.job_id, js.CANCELLED, "cancelled",
                                  "cancelled; checkpoints kept")
        updated = self.store.get(job.job_id)
        assert updated is not None
        return updated

    def pause(self, msg: PauseJob) -> Reply:
        """Hold the job: a queued one at once, a running one once it has stopped after a
        checkpoint (its reply still says ``running``). A held job is returned unchanged; one
        that has ended is refused."""
        job = self._job(msg.job_id)
        if isinstance(job, Error) or job.status == js.HELD:
            return job
        if job.status in js.TERMINAL:
            return _conflict(f"job {job.job_id} has {job.status}; only a queued or running "
                             f"job can be paused")
        if job.status == js.VALIDATING:
            return _conflict(f"job {job.job_id}'s files are being checked; pause it once it is "
                             f"queued")
        if job.job_id == self.running:
            if job.job_id not in self._pausing:
                self._pausing.add(job.job_id)
                self.send(StopJob(job_id=job.job_id, reason="paused", keep_progress=True))
                self.store.add_event(job.job_id, "pause", "pause requested; stops after a "
                                     "checkpoint at its next step boundary")
        else:
            self.store.set_status(job.job_id, js.HELD, "paused",
                                  "paused; not scheduled until resumed")
        return self._job(job.job_id)

    def resume(self, msg: ResumeJob) -> Reply:
        """Queue a held job again (it resumes from its last checkpoint); a running job whose
        pause has not taken effect yet is queued again as soon as it stops. A queued or
        running job is returned unchanged; one that has ended is refused."""
        job = self._job(msg.job_id)
        if isinstance(job, Error):
            return job
        if job.status in js.TERMINAL:
            return _conflict(f"job {job.job_id} has {job.status}; only a paused job can be "
                             f"resumed")
        if job.job_id in self._pausing:
            self._pausing.discard(job.job_id)
            self.store.add_event(job.job_id, "resume", "resumed before its pause took "
                                 "effect; queued again once it has stopped")
        elif job.status == js.HELD:
            self.store.set_status(job.job_id, js.QUEUED, "resumed",
                                  "resumed; queued" + (f", continues from checkpoint-"
                                                       f"{job.checkpoint_step}"
                                                       if job.checkpoint_step else ""))
            self._queue_changed = True
        return self._job(job.job_id)

    def checkpoints(self, msg: JobCheckpoints) -> Reply:
        job = self._job(msg.job_id)
        if isinstance(job, Error):
            return job
        served = set(self.served_names())
        found = [msgspec.structs.replace(c, served_as=name)
                 if (name := f"{job.name}@step-{c.step}") in served else c
                 for c in self.store.checkpoints(job.job_id)]
        return CheckpointList(job_id=job.job_id, checkpoints=found)

    # -- uploaded files ----------------------------------------------------------------------

    def add_file(self, msg: AddFile) -> Reply:
        try:
            return self.files.add(msg)
        except FileRefused as e:
            return Error(request_id=None, code=ErrorCode.INVALID, message=str(e))

    def list_files(self, msg: ListFiles) -> FileList:
        return FileList(files=self.files.all(msg.owner))

    def show_file(self, msg: ShowFile) -> Reply:
        return self._file(msg.file_id)

    def delete_file(self, msg: DeleteFile) -> Reply:
        """Remove the file, unless a job that has not ended names it (it reads the file
        again when it starts or resumes)."""
        found = self._file(msg.file_id)
        if isinstance(found, Error):
            return found
        users = [j for j in self.store.all_jobs() if j.status not in js.TERMINAL
                 and found.path in (j.spec.dataset, j.spec.validation_file)]
        if users:
            return _conflict(f"file {msg.file_id} is used by job "
                             f"{', '.join(str(j.job_id) for j in users)}, which has not "
                             f"ended; cancel it first, or wait for it to end")
        gone = self.files.remove(msg.file_id)
        return gone if gone is not None else self._file(msg.file_id)

    def _file(self, file_id: str) -> FileInfo | Error:
        found = self.files.get(file_id)
        if found is None:
            return Error(request_id=None, code=ErrorCode.NOT_FOUND,
                         message=f"no file with id {file_id}")
        return found

    def _job(self, job_id: int) -> JobInfo | Error:
        job = self.store.get(job_id)
        if job is None:
            return Error(request_id=None, code=ErrorCode.UNKNOWN_REQUEST,
                         message=f"no job with id {job_id}")
        return self._with_validation(job)

    # -- the finetune process ------------------------------------------------------------------

    def on_ready(self) -> None:
        self.finetune_ready = True
        self._queue_changed = True

    def on_exit(self, ev: ChildExited) -> None:
        self.finetune_ready = False
        self._queue_changed = True
        if self.running is not None:
            job = self.store.get(self.running)
            ckpt = job.checkpoint_step if job else None
            self.store.requeue_active(
                f"finetune process died ({describe_returncode(ev.returncode)}); resumes from "
                + (f"checkpoint-{ckpt}" if ckpt else "the start"))
            if self.running in self._pausing:  # the pause asked for still holds it
                self._pausing.discard(self.running)
                self.store.set_status(self.running, js.HELD, "paused",
                                      "paused; resumes from " + (f"checkpoint-{ckpt}" if ckpt
                                                                 else "the start"))
            self.running = None

    def on_micro_step(self, msg: MicroStepReport) -> None:
        if msg.job_id != self.running:
            return
        tps = msg.step_tokens / msg.duration_s if msg.duration_s > 0 else 0.0
        prev = self._tps.get(msg.job_id)
        self._tps[msg.job_id] = tps if prev is None else (
            _TPS_ALPHA * tps + (1 - _TPS_ALPHA) * prev)
        self.store.record_progress(msg, self._tps[msg.job_id])
        self.metrics.on_micro_step(msg)

    def on_job_started(self, msg: JobStarted) -> None:
        if msg.dataset_report.get("source") != "cache":
            logger.warning("[jobs] job %d: the finetune tokenized its dataset again (not in the "
                           "cache the attach filled)", msg.job_id)
            self.metrics.dataset_retokenized.inc()
        self.store.record_start(msg.job_id, msg.total_steps, msg.resumed_from_step,
                                dict(msg.dataset_report))

    def on_step_logged(self, msg: StepLogged) -> None:
        if msg.job_id != self.running:
            return
        self.store.record_step(msg)

    def on_checkpoint(self, msg: CheckpointSaved) -> None:
        self.store.record_checkpoint(msg)
        if msg.validation is not None:
            self.metrics.on_validation(msg.job_id, msg.validation)
        elif msg.validation_error:
            logger.warning("[jobs] job %d: checkpoint-%d not validated: %s", msg.job_id,
                           msg.step, msg.validation_error)

    def on_job_ended(self, msg: JobEnded) -> None:
        if msg.job_id == self.running:
            self.running = None
        self._queue_changed = True
        if msg.status == STOPPED:
            self._on_stopped(msg.job_id, msg.error)
            return
        self._pausing.discard(msg.job_id)
        text = {"succeeded": f"finished; adapter in {msg.adapter_path}",
                "cancelled": "cancelled; checkpoints kept",
                "failed": f"failed: {msg.error}"}.get(msg.status, msg.status)
        self.store.set_status(msg.job_id, msg.status, msg.status, text, error=msg.error,
                              adapter_path=msg.adapter_path)
        self._prune_dataset_cache()

    def _on_stopped(self, job_id: int, error: str | None) -> None:
        """A job stopped with its progress in a checkpoint, for a pause: held, or queued
        again when it was resumed meanwhile. ``error``: why progress since its last
        checkpoint was lost, if it was."""
        job = self.store.get(job_id)
        where = f"checkpoint-{job.checkpoint_step}" if job and job.checkpoint_step else "the start"
        note = f" ({error})" if error else ""
        if job_id in self._pausing:
            self._pausing.discard(job_id)
            self.store.set_status(job_id, js.HELD, "paused",
                                  f"paused; resumes from {where} when resumed{note}")
        else:
            self.store.set_status(job_id, js.QUEUED, "requeued",
                                  f"stopped and queued again; resumes from {where}{note}")

    def _prune_dataset_cache(self) -> None:
        """Keep the tokenized datasets of the jobs that may still run, drop the rest. Not
        while files are being checked: a worker's entry is in place a moment before the job's
        report names it."""
        if len(self.validations):
            return
        keep = {str(j.dataset_report.get(key)) for j in self.store.all_jobs()
                if j.status not in js.TERMINAL and j.dataset_report
                for key in ("cache_key", "validation_cache_key")}
        removed = self.dataset_cache.prune(keep)
        if removed:
            logger.info("[jobs] removed %d tokenized dataset(s) no job needs", removed)

    def on_fatal(self, msg: FinetuneFatal) -> None:
        logger.error("[jobs] finetune[%d] fatal: %s\n%s", msg.incarnation, msg.error,
                     msg.traceback)

    def tick(self) -> None:
        """Start the next queued job when the finetune process is idle."""
        if not self._queue_changed or not self.finetune_ready or self.running is not None:
            return
        if not self.may_start_job():
            return  # the queue stays marked changed: looked at again next turn
        self._queue_changed = False
        job = self.store.next_queued()
        if job is None:
            return
        decision = self.quota.decision
        status = js.RUNNING if decision.admitted else js.PAUSED
        if not self.send(StartJob(job_id=job.job_id, spec=job.spec,
                                  model_path=str(self.cfg.model_path))):
            self._queue_changed = True  # finetune_proc not connected yet: try next turn
        else:
            self.running = job.job_id
            self.store.set_status(job.job_id, status, "scheduled",
                                  f"handed to the finetune process at level "
                                  f"{decision.level}")

    def queued(self) -> int:
        return sum(1 for j in self.store.all_jobs() if j.status == js.QUEUED)


def _conflict(message: str) -> Error:
    return Error(request_id=None, code=ErrorCode.CONFLICT, message=message)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
