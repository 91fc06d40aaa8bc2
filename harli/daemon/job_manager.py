"""``JobManager``: the daemon's finetune side. It answers the control API (attach, list, show,
cancel, logs), keeps the job store, feeds the finetune process one job at a time (highest
priority, then oldest), hands it the quota decision, and requeues the running job when the
process dies so that it resumes from its last checkpoint.

No sockets here: the daemon passes messages in and gives it a ``send`` callable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from harli.config import HarliConfig
from harli.daemon import jobstore as js
from harli.daemon.attach import AttachRefused, AttachValidator
from harli.daemon.jobstore import JobStore
from harli.daemon.metrics import Metrics
from harli.daemon.supervisor import ChildExited, describe_returncode
from harli.ipc.control import (
    AttachJob,
    CancelJob,
    ControlReply,
    JobDetail,
    JobList,
    JobLogs,
    ListJobs,
    ShowJob,
)
from harli.ipc.finetune import (
    CheckpointSaved,
    DaemonToFinetune,
    Decision,
    FinetuneFatal,
    FinetuneToDaemon,
    JobEnded,
    JobStarted,
    MicroStepReport,
    StartJob,
    StopJob,
)
from harli.ipc.inference import Error, ErrorCode

logger = logging.getLogger(__name__)

Reply = ControlReply | Error
JobRequest = AttachJob | ListJobs | ShowJob | CancelJob | JobLogs
_TPS_ALPHA = 0.2  # EWMA weight of the newest micro-step in tokens/s


class JobManager:
    def __init__(self, cfg: HarliConfig, send: Callable[[DaemonToFinetune], bool],
                 metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.send = send
        self.store = JobStore(cfg.state_dir / "jobs.sqlite")
        self.validator = AttachValidator(cfg.model_path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attach")
        self.finetune_ready = False
        self.running: int | None = None  # job id handed to the finetune process
        self.decision = Decision(level=cfg.finetune.level, admitted=cfg.finetune.level > 0,
                                 seq=1)
        self._tps: dict[int, float] = {}
        # Set when the queue or the finetune's readiness may have changed, so the daemon loop
        # looks at SQLite only then, not on every turn.
        self._queue_changed = True
        # A job starts only while this says yes (CUDA hosts sharing decode's weights: once the
        # finetune holds them, see WeightsRelay.may_start_job).
        self.may_start_job: Callable[[], bool] = lambda: True
        for job_id in self.store.requeue_active("daemon restarted; resumes from its last "
                                                "checkpoint"):
            logger.info("[jobs] job %d was running when the daemon stopped; requeued", job_id)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    # -- control API -------------------------------------------------------------------------

    def handle(self, msg: JobRequest) -> Reply | Future[Reply]:
        if isinstance(msg, AttachJob):
            return self._executor.submit(self._attach, msg)
        if isinstance(msg, ListJobs):
            return JobList(jobs=self.store.all_jobs())
        job = self.store.get(msg.job_id)
        if job is None:
            return Error(request_id=None, code=ErrorCode.UNKNOWN_REQUEST,
                         message=f"no job with id {msg.job_id}")
        if isinstance(msg, ShowJob):
            return JobDetail(job=job, events=self.store.events(job.job_id)[-20:])
        if isinstance(msg, JobLogs):
            return JobDetail(job=job, events=self.store.events(job.job_id, msg.after_event))
        assert isinstance(msg, CancelJob)
        return self._cancel(job.job_id)

    def _attach(self, msg: AttachJob) -> Reply:
        # Runs on the attach thread: tokenizing a dataset must not stall the serving loop.
        spec = msg.spec
        taken = {j.spec.output_dir: j.spec.name for j in self.store.all_jobs()
                 if j.status not in js.TERMINAL}
        try:
            if any(j.name == spec.name for j in self.store.all_jobs()):
                raise AttachRefused(f"a job named {spec.name!r} exists already; choose "
                                    f"another name")
            report = self.validator.validate(spec, taken)
            job = self.store.add(spec, report)
        except AttachRefused as e:
            return Error(request_id=None, code=ErrorCode.INVALID, message=str(e))
        except js.DuplicateJobName:
            return Error(request_id=None, code=ErrorCode.INVALID,
                         message=f"a job named {spec.name!r} exists already")
        logger.info("[jobs] attached job %d %r", job.job_id, spec.name)
        self._queue_changed = True
        return job

    def _cancel(self, job_id: int) -> Reply:
        job = self.store.get(job_id)
        assert job is not None
        if job.status in js.TERMINAL:
            return job
        if job_id == self.running:
            self.send(StopJob(job_id=job_id, reason="cancelled"))
            self.store.add_event(job_id, "cancel", "cancel requested; stops at the next "
                                 "micro-step boundary")
        else:
            self.store.set_status(job_id, js.CANCELLED, "cancelled",
                                  "cancelled; checkpoints kept")
        updated = self.store.get(job_id)
        assert updated is not None
        return updated

    # -- the finetune process ------------------------------------------------------------------

    def set_level(self, level: int) -> None:
        """A new quota level for the finetune (0 pauses it); sent at once."""
        if not 0 <= level <= self.cfg.finetune.levels:
            raise ValueError(f"level must be 0..{self.cfg.finetune.levels}, got {level}")
        if level == self.decision.level:
            return
        self.decision = Decision(level=level, admitted=level > 0, seq=self.decision.seq + 1)
        logger.info("[jobs] finetune quota level -> %d", level)
        if self.finetune_ready:
            self.send(self.decision)

    def on_ready(self) -> None:
        self.finetune_ready = True
        self._queue_changed = True
        self.send(self.decision)

    def on_exit(self, ev: ChildExited) -> None:
        self.finetune_ready = False
        self._queue_changed = True
        if self.running is not None:
            job = self.store.get(self.running)
            ckpt = job.checkpoint_step if job else None
            self.store.requeue_active(
                f"finetune process died ({describe_returncode(ev.returncode)}); resumes from "
                + (f"checkpoint-{ckpt}" if ckpt else "the start"))
            self.running = None

    def on_message(self, msg: FinetuneToDaemon) -> None:
        if isinstance(msg, MicroStepReport):
            if msg.job_id != self.running:
                return
            tps = msg.step_tokens / msg.duration_s if msg.duration_s > 0 else 0.0
            prev = self._tps.get(msg.job_id)
            self._tps[msg.job_id] = tps if prev is None else (
                _TPS_ALPHA * tps + (1 - _TPS_ALPHA) * prev)
            self.store.record_progress(msg, self._tps[msg.job_id])
            self.metrics.on_micro_step(msg)
        elif isinstance(msg, JobStarted):
            self.store.record_start(msg.job_id, msg.total_steps, msg.resumed_from_step,
                                    dict(msg.dataset_report))
        elif isinstance(msg, CheckpointSaved):
            self.store.record_checkpoint(msg.job_id, msg.step, msg.path)
        elif isinstance(msg, JobEnded):
            if msg.job_id == self.running:
                self.running = None
            self._queue_changed = True
            text = {"succeeded": f"finished; adapter in {msg.adapter_path}",
                    "cancelled": "cancelled; checkpoints kept",
                    "failed": f"failed: {msg.error}"}.get(msg.status, msg.status)
            self.store.set_status(msg.job_id, msg.status, msg.status, text, error=msg.error,
                                  adapter_path=msg.adapter_path)
        elif isinstance(msg, FinetuneFatal):
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
        status = js.RUNNING if self.decision.admitted else js.PAUSED
        if not self.send(StartJob(job_id=job.job_id, spec=job.spec,
                                  model_path=str(self.cfg.model_path))):
            self._queue_changed = True  # finetune_proc not connected yet: try next turn
        else:
            self.running = job.job_id
            self.store.set_status(job.job_id, status, "scheduled",
                                  f"handed to the finetune process at level "
                                  f"{self.decision.level}")

    def info(self) -> dict[str, Any]:
        return {"running": self.running, "decision_level": self.decision.level,
                "queued": sum(1 for j in self.store.all_jobs() if j.status == js.QUEUED)}
