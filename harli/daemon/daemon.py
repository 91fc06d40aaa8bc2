"""``Daemon``: the supervising process. One loop: poll sockets -> handle -> tick the children.

The daemon composes; its parts do the work. ``DaemonResources`` holds the arena and the seven
sockets, ``ChildSpecs`` builds the two supervised children, the ``Frontend`` serves clients
and keeps the request table, the ``ControlEndpoint`` answers the control API, the
``JobManager`` runs finetune jobs, the ``QuotaScheduler`` decides the finetune's quota level
and the ``QuotaController`` holds and sends it, the ``MemoryManager`` lends arena pages. What
the children send is routed by one ``Dispatcher`` table per socket to the parts it concerns.

Signals only set a flag; shutdown is a state machine: ``SERVING -> DRAINING`` (new work
refused, in-flight work may finish) ``-> STOPPING`` (the rest is aborted with
``finish_reason="shutdown"``, children stopped by the ladder) ``-> STOPPED``.
"""

from __future__ import annotations

import enum
import gc
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from harli.config import ENV, HarliConfig
from harli.daemon.adapter_registry import AdapterRegistry
from harli.daemon.children import ChildSpecs, CorePlan
from harli.daemon.control_endpoint import ControlEndpoint, ControlHandler, control_handlers
from harli.daemon.disabled import NullMemory
from harli.daemon.dispatch import Dispatcher
from harli.daemon.frontend import Frontend
from harli.daemon.gpu_faults import FaultContainment
from harli.daemon.job_manager import JobManager
from harli.daemon.latency import LatencyTracker
from harli.daemon.memory import MemoryManager
from harli.daemon.metrics import Metrics
from harli.daemon.models import ModelCatalog
from harli.daemon.mps import control_for, cuda_host
from harli.daemon.quota import QuotaController
from harli.daemon.quota_scheduler import scheduler_for
from harli.daemon.resources import DaemonResources
from harli.daemon.sdnotify import Notifier, Watchdog
from harli.daemon.supervisor import Child, ChildExited, ChildState, PopenOps, ProcessOps
from harli.daemon.weights_relay import WeightsRelay
from harli.ipc.control import (
    AddAdapter,
    ChildStatus,
    DaemonStatus,
    ListModels,
    RemoveAdapter,
)
from harli.ipc.decode import (
    BlocksLent,
    BlocksReturned,
    DecodeToDaemon,
    Fatal,
    IterationTelemetry,
    Ready,
    RuntimeInfo,
    Shutdown,
    StepOutputs,
)
from harli.ipc.finetune import (
    CheckpointSaved,
    FinetuneFatal,
    FinetuneReady,
    FinetuneShutdown,
    FinetuneToDaemon,
    JobEnded,
    JobStarted,
    LeaseReturned,
    MicroStepReport,
    StepLogged,
)
from harli.ipc.http import HttpFatal, HttpReady, HttpToDaemon
from harli.ipc.inference import ErrorCode
from harli.ipc.weights import WeightsExported

logger = logging.getLogger(__name__)


class DaemonState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Daemon:
    def __init__(self, cfg: HarliConfig, ops: ProcessOps | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.state = DaemonState.STARTING
        self.exit_code = 0
        self.runtime: RuntimeInfo | None = None  # from the running decode's Ready
        self.finetune_quota = ""  # as the finetune reports it in FinetuneReady
        self.iterations_seen = 0
        self.notifier = Notifier(ENV.notify_socket)
        self.watchdog = Watchdog.from_environ(self.notifier)
        self._stop_signal: str | None = None
        self._drain_deadline = 0.0
        _make_dirs(cfg)
        self.cuda_host = cuda_host()
        self.resources = DaemonResources(cfg, self.cuda_host)
        try:
            self._init_parts(ops or PopenOps())
        except BaseException:
            self.resources.close()
            raise

    def _init_parts(self, ops: ProcessOps) -> None:
        cfg, res = self.cfg, self.resources
        self.cores = CorePlan.for_host(cfg, self.cuda_host)
        self.cores.pin_daemon()
        self.metrics = Metrics(cfg.vllm_metrics_dir)
        self.latency = _load_latency(cfg, self.metrics)
        # MPS (CUDA hosts, gpu.mps != off): both children become clients of one server; the
        # control daemon starts in run(), before them.
        self.mps = control_for(cfg.gpu, cfg.runtime_dir)
        self.faults = FaultContainment(self.mps.new_server_log) if self.mps else None
        specs = ChildSpecs(cfg, self.cores, res.arena.handle if res.arena else None, self.mps,
                           ops)
        self.finetune = specs.finetune()
        self.quota = QuotaController(cfg.finetune, res.send_finetune, self.finetune,
                                     self.cores.fence, self.metrics)
        self.scheduler = scheduler_for(cfg, self.latency.model, self.quota, self.metrics,
                                       self.cores.dominated_by(cfg, self.cuda_host),
                                       self.cores.spills(cfg, self.cuda_host))
        # CUDA hosts: the finetune builds its model on views of decode's weights.
        self.weights = WeightsRelay(cfg.gpu.share_weights and cfg.finetune.enabled
                                    and self.cuda_host)
        self.jobs = JobManager(cfg, res.send_finetune, self.metrics, self.quota,
                               may_start_job=self._may_start_job)
        # The servable models: the base model and the adapters registered in the job store.
        self.models = ModelCatalog(cfg, AdapterRegistry(self.jobs.store.db), res.send_decode,
                                   self.jobs.store.add_event, self.jobs.store.set_fine_tuned_model)
        self.jobs.served_names = self.models.names  # a job's published checkpoints
        self.memory = MemoryManager(
            cfg.memory, res.arena.handle.num_pages, res.arena.handle.page_bytes,
            res.send_decode, res.send_finetune, self.finetune.kill, self.metrics,
        ) if res.arena is not None else NullMemory()
        self.decode = specs.decode(may_start=self.memory.may_start_decode)
        # The OpenAI HTTP API: a client of the endpoints above, in a process of its own.
        self.http = specs.http(res.http_listener)
        self.http_url = ""  # where it answers, once it said so
        self.children = tuple(c for c in (self.decode, self.finetune, self.http)
                              if isinstance(c, Child))
        self.metrics.watch_children(self.children)
        self.frontend = Frontend(
            res.inference, cfg, self.metrics, send_decode=res.send_decode,
            decode_running=lambda: self.decode.state is ChildState.RUNNING,
            decode_incarnation=lambda: self.decode.incarnation,
            runtime=lambda: self.runtime,
            accepting=lambda: self.state in (DaemonState.STARTING, DaemonState.SERVING),
            observer=self.scheduler, clock=self.clock, resolve_model=self.models.resolve,
            on_loras_loaded=self.models.on_loaded)
        self.control_endpoint = ControlEndpoint(
            res.control, cfg.endpoints.max_message_bytes,
            control_handlers(self.jobs, self.status, lambda spec, tpot_slo_ms:
                             self.scheduler.set_policy(spec, self.clock(), tpot_slo_ms),
                             self.metrics.page, models=self._model_handlers()))
        self._init_dispatch()

    def _init_dispatch(self) -> None:
        now = self.clock
        self._from_decode = Dispatcher("decode", DecodeToDaemon, {
            StepOutputs: self.frontend.on_step_outputs,
            Ready: self._on_decode_ready,
            BlocksLent: lambda m: self.memory.on_blocks_lent(m, now()),
            BlocksReturned: self.memory.on_blocks_returned,
            WeightsExported: self._on_weights_exported,
            Fatal: self._on_decode_fatal,
        }, self.metrics)
        self._from_telemetry = Dispatcher("telemetry", IterationTelemetry, {
            IterationTelemetry: self._on_telemetry,
        }, self.metrics)
        self._from_finetune = Dispatcher("finetune", FinetuneToDaemon, {
            FinetuneReady: self._on_finetune_ready,
            LeaseReturned: lambda m: self.memory.on_lease_returned(m, now()),
            FinetuneFatal: self._on_finetune_fatal,
            MicroStepReport: self._on_micro_step,
            JobStarted: self._on_job_started,
            StepLogged: self.jobs.on_step_logged,
            CheckpointSaved: self._on_checkpoint,
            JobEnded: self._on_job_ended,
        }, self.metrics)
        self._from_http = Dispatcher("http", HttpToDaemon, {
            HttpReady: self._on_http_ready,
            HttpFatal: self._on_http_fatal,
        }, self.metrics)

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: only records the request."""
        self._stop_signal = reason

    def run(self) -> int:
        try:
            if self.cfg.metrics.port:
                self.metrics.serve(self.cfg.metrics.addr, self.cfg.metrics.port)
            if self.mps is not None:
                self.mps.start()  # a CUDA program looks for MPS once, at cuInit
            for child in self.children:
                child.start(self.clock())
            # The start-up heap (config, profile samples, imports) lives as long as the daemon:
            # out of the collector's reach, a full collection no longer walks it in the middle
            # of a scheduling decision (what vLLM's engine core does with freeze_gc_heap).
            gc.collect()
            gc.freeze()
            while self.state is not DaemonState.STOPPED:
                self._poll_once()
                now = self.clock()
                self._tick(now)
                self.watchdog.kick(now, self._healthy())
        finally:
            self._close()
        return self.exit_code

    def _healthy(self) -> bool:
        # Healthy = this loop turns (a stuck loop never gets here) and decode is not FATAL
        # (a daemon that cannot serve should be restarted by systemd, not kept alive).
        return self.decode.state is not ChildState.FATAL

    def _poll_once(self) -> None:
        res = self.resources
        events = res.poll(max(1, int(self.cfg.daemon.tick_s * 1000)))
        # Each drain contains its messages' failures; this guard keeps a socket's failure
        # (a bug in a drain itself) from ending the loop or starving the sockets after it.
        if res.decode_out in events:
            self._contained("decode messages", lambda: self._from_decode.drain(res.decode_out))
        if res.telemetry in events:
            self._contained("telemetry", lambda: self._from_telemetry.drain(res.telemetry))
        if res.inference in events:
            self._contained("inference", self.frontend.drain)
        if res.finetune_out in events:
            self._contained("finetune messages",
                            lambda: self._from_finetune.drain(res.finetune_out))
        if res.control in events:
            self._contained("control", self.control_endpoint.drain)
        if res.http_out in events:
            self._contained("http messages", lambda: self._from_http.drain(res.http_out))

    def _tick(self, now: float) -> None:
        for fev in self.finetune.transition(now):
            if isinstance(fev, ChildExited):
                self._contained("finetune exit", partial(self._on_finetune_exit, fev, now))
            else:
                logger.error("[daemon] finetune process is FATAL; jobs stay queued")
        if self.state is DaemonState.SERVING:
            self._contained("jobs", self.jobs.tick)
        self._contained("memory", lambda: self.memory.tick(now))
        for hev in self.http.transition(now):
            if not isinstance(hev, ChildExited):
                logger.error("[daemon] the HTTP front is FATAL (see its log above); the "
                             "ZeroMQ endpoints keep serving")
        self._contained("metrics", lambda: self._tick_metrics(now))
        self._contained("validation", lambda: self._tick_validations(now))
        self._contained("control", self.control_endpoint.reply_done)
        for ev in self.decode.transition(now):
            if isinstance(ev, ChildExited):
                self._on_decode_exit(ev)
            else:
                logger.error("[daemon] decode process is FATAL; shutting down with failure")
                self.exit_code = 1
                self.frontend.fail_pending(ErrorCode.UNAVAILABLE,
                                           "decode process failed to start")
                self._begin_drain(now, "decode fatal")
                self._drain_deadline = now
        if self._stop_signal is not None and self.state in (DaemonState.STARTING,
                                                            DaemonState.SERVING):
            self._begin_drain(now, self._stop_signal)
        if self.state is DaemonState.DRAINING and (not len(self.frontend.requests)
                                                   or now >= self._drain_deadline):
            self._stop_all()

    def _tick_metrics(self, now: float) -> None:
        self.metrics.tick(now)
        in_flight = len(self.frontend.requests)
        if not in_flight:
            self.scheduler.on_idle(now)
        # Requests that wait for a decode starting or restarting do not run either (those of
        # a dead incarnation failed at its exit).
        if not in_flight or self.decode.state is not ChildState.RUNNING:
            self.metrics.on_idle()

    def _tick_validations(self, now: float) -> None:
        # Checking files is finetune-class work: it yields while decode serves at level 0.
        self.jobs.validations.hold(self.quota.level == 0 and len(self.frontend.requests) > 0,
                                   now)
        self.jobs.poll_validations()

    def _contained(self, part: str, work: Callable[[], object]) -> None:
        """Run one part of a loop turn; a failure (a bug, or a system call that failed on
        what a client named) is logged and counted, and the loop turns on: the daemon's
        other work, and every other client, must not end with it."""
        try:
            work()
        except Exception:
            logger.exception("[daemon] %s failed; the daemon serves on", part)
            self.metrics.contained_errors.labels(part).inc()

    def _begin_drain(self, now: float, reason: str) -> None:
        if self.state in (DaemonState.DRAINING, DaemonState.STOPPING, DaemonState.STOPPED):
            return
        self.jobs.stop_accepting()
        logger.info("[shutdown] daemon: %s; draining %d requests (up to %.1f s)", reason,
                    len(self.frontend.requests), self.cfg.daemon.drain_timeout_s)
        self.notifier.stopping()
        self.state = DaemonState.DRAINING
        self._drain_deadline = now + self.cfg.daemon.drain_timeout_s

    def _stop_all(self) -> None:
        self.state = DaemonState.STOPPING
        self.frontend.finish_all("shutdown")
        self.http.stop(None)  # SIGTERM: uvicorn closes its connections
        # Reverse dependency order: finetune before decode.
        self.finetune.stop(lambda: self.resources.send_finetune(
            FinetuneShutdown(reason="daemon stopping")))
        self.decode.stop(lambda: self.resources.send_decode(Shutdown(reason="daemon stopping")))
        self.state = DaemonState.STOPPED

    def _close(self) -> None:
        # After an exception: never leave a child.
        for child in (self.http, self.finetune, self.decode):
            if child.proc is not None:
                child.stop(None)
        if self.mps is not None:
            self.mps.stop()  # after its clients; only a daemon we started
        self.jobs.close()
        self.metrics.close()
        self.resources.close()  # the arena after both children, then the sockets
        logger.info("[shutdown] daemon stopped (exit %d)", self.exit_code)

    # -- decode_proc -------------------------------------------------------------------------

    def _on_decode_ready(self, msg: Ready) -> None:
        if not self.decode.on_ready(msg.incarnation, self.clock()):
            return
        self.runtime = msg.info
        self.memory.on_decode_ready(msg.incarnation, msg.info, self.clock())
        if self.state is DaemonState.STARTING:
            self.state = DaemonState.SERVING
            self.notifier.ready(f"serving {msg.info.model}")
        self.frontend.dispatch_pending()

    def _on_weights_exported(self, msg: WeightsExported) -> None:
        if self.weights.on_exported(msg, self.decode.incarnation) \
                and self.finetune.state is ChildState.RUNNING:
            self.weights.relay(self.finetune.incarnation, self.resources.send_finetune)

    def _on_decode_fatal(self, msg: Fatal) -> None:
        # The child logged its own traceback (none for a configuration error, which is one
        # line): the journal need not hold it twice.
        logger.error("[daemon] decode[%d] reported a fatal error: %s", msg.incarnation,
                     msg.error)
        logger.debug("[daemon] decode[%d]'s traceback:\n%s", msg.incarnation, msg.traceback)
        self._check_gpu_fault(msg, "decode")

    def _on_decode_exit(self, ev: ChildExited) -> None:
        self.metrics.on_decode_exit()
        self.memory.on_decode_exit(self.clock())
        self.models.on_decode_exit()
        self.frontend.on_decode_exit(ev)
        restart = self.weights.on_decode_exit(self.finetune.incarnation,
                                              self.jobs.running is not None)
        if restart is not None:
            # Forced: not counted toward the finetune's FATAL limit. The job manager requeues
            # its job at the exit.
            self.finetune.restart(restart)
        self._check_gpu_fault(ev)

    def _on_telemetry(self, t: IterationTelemetry) -> None:
        self.iterations_seen += 1
        self.metrics.on_iteration(t)
        self.memory.on_telemetry(t)
        measured_s = self.latency.on_telemetry(
            t, self.quota.level_in_force(self.jobs.running is not None), self.clock())
        # Before the scheduler decides for the next iteration: its last decision is the one
        # made for this iteration.
        self.metrics.on_token_latency(measured_s, self.scheduler.predicted_upper_s,
                                      self.scheduler.tpot_slo_s)
        self.scheduler.on_telemetry(t, self.clock())

    # -- http_proc ---------------------------------------------------------------------------

    def _on_http_ready(self, msg: HttpReady) -> None:
        if self.http.on_ready(msg.incarnation, self.clock()):
            self.http_url = msg.url
            logger.info("[daemon] OpenAI-compatible HTTP API on %s", msg.url)

    def _on_http_fatal(self, msg: HttpFatal) -> None:
        logger.error("[daemon] http[%d] cannot serve: %s", msg.incarnation, msg.error)

    # -- finetune_proc -----------------------------------------------------------------------

    def _on_finetune_ready(self, msg: FinetuneReady) -> None:
        if not self.finetune.on_ready(msg.incarnation, self.clock()):
            return
        self.finetune_quota = msg.quota
        logger.info("[daemon] finetune[%d] quota: %s", msg.incarnation, msg.quota or "-")
        # In this order on one socket: decode's weights, then the decision, then any job.
        self.weights.relay(msg.incarnation, self.resources.send_finetune)
        self.quota.on_finetune_ready()
        self.jobs.on_ready()

    def _on_finetune_fatal(self, msg: FinetuneFatal) -> None:
        self._check_gpu_fault(msg, "finetune")
        self.jobs.on_fatal(msg)

    def _on_micro_step(self, msg: MicroStepReport) -> None:
        self.jobs.on_micro_step(msg)
        self.scheduler.on_micro_step(msg, self.clock())
        self.memory.on_micro_step(msg)

    def _on_job_started(self, msg: JobStarted) -> None:
        self.jobs.on_job_started(msg)
        self.scheduler.on_step_gap(self.clock(), same_job=False)
        self.memory.set_finetune_training(True, self.clock())

    def _on_checkpoint(self, msg: CheckpointSaved) -> None:
        self.jobs.on_checkpoint(msg)
        self.scheduler.on_step_gap(self.clock(), same_job=True)
        job = self.jobs.store.get(msg.job_id)
        if job is not None and job.spec.publish_checkpoints:
            self.models.on_checkpoint(job.job_id, job.name, msg.step, msg.path)

    def _on_job_ended(self, msg: JobEnded) -> None:
        self.jobs.on_job_ended(msg)
        self.metrics.on_job_ended(msg.job_id, self.clock())
        job = self.jobs.store.get(msg.job_id)
        if job is not None and msg.status == "succeeded":
            self.models.on_job_succeeded(job.job_id, job.name, msg.adapter_path)
        self.scheduler.on_step_gap(self.clock(), same_job=False)
        self.memory.set_finetune_training(False, self.clock())

    def _on_finetune_exit(self, ev: ChildExited, now: float) -> None:
        self.jobs.on_exit(ev)
        self.quota.on_finetune_exit()
        self._check_gpu_fault(ev)
        self.scheduler.on_step_gap(now, same_job=False)  # nothing in flight
        self.memory.on_finetune_exit(now)

    def _model_handlers(self) -> dict[type[Any], ControlHandler]:
        """``harli models`` and ``harli adapter add / rm``: the catalog, with the requests in
        flight per model (the frontend's)."""
        def in_use() -> dict[str, int]:
            return {name or self.models.base_name: n
                    for name, n in self.frontend.requests.by_model().items()}

        return {ListModels: lambda m: self.models.list_models(m, in_use()),
                AddAdapter: self.models.add,
                RemoveAdapter: lambda m: self.models.remove(
                    m, in_use(), self.frontend.end_adapter_requests)}

    def _may_start_job(self) -> bool:
        return self.weights.may_start_job(self.finetune.incarnation,
                                          self.runtime.device if self.runtime else None)

    # -- control API -------------------------------------------------------------------------

    def status(self) -> DaemonStatus:
        """What ``harli status`` shows (the control API's ``GetStatus``)."""
        children = [ChildStatus(name=c.name, state=c.state.value, incarnation=c.incarnation,
                                restarts=c.restarts, pid=c.proc.pid if c.proc else None,
                                forced_restarts=c.forced_restarts) for c in self.children]
        return DaemonStatus(state=self.state.value, pid=os.getpid(), children=children,
                            model=self.runtime.model if self.runtime else None,
                            decode_iterations=self.iterations_seen,
                            memory=self.memory.status(), job_running=self.jobs.running,
                            jobs_queued=self.jobs.queued(), level=self.quota.level,
                            predictor=self.latency.status(self.clock()),
                            scheduler=self.scheduler.status(),
                            finetune_quota=self.finetune_quota, http_url=self.http_url)

    # -- MPS ---------------------------------------------------------------------------------

    def _check_gpu_fault(self, what: ChildExited | Fatal | FinetuneFatal, name: str = "") -> None:
        """Under MPS a GPU fault ends every client: restart the other child too (the normal
        crash path; a finetune job resumes from its checkpoint)."""
        if self.faults is None:
            return
        decision = self.faults.on_exit(what, self.children) if isinstance(what, ChildExited) \
            else self.faults.on_fatal(name, what.incarnation, f"{what.error}\n{what.traceback}",
                                      self.children)
        if decision is not None:
            decision.apply()


def _make_dirs(cfg: HarliConfig) -> None:
    # File permissions on the runtime dir are the access control of the ipc:// sockets.
    cfg.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)


def _load_latency(cfg: HarliConfig, metrics: Metrics) -> LatencyTracker:
    if not cfg.model.path:
        from harli.model.tiny import ensure_tiny

        ensure_tiny(cfg.model_path, cfg.model.tiny_seed)
    # After the model exists: the profile's key names the model's config digest.
    return LatencyTracker.load(cfg, metrics)
