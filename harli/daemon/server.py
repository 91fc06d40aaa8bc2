"""``Daemon``: the supervising process. One loop: poll sockets -> handle -> tick the children.

It owns the sockets (the public inference and control ROUTERs, the internal ones to decode_proc
and finetune_proc), the children's supervisors, the memory manager, the predictor and the
scheduler. Client messages and the request table are the ``Frontend``'s (frontend.py), control
requests the ``ControlEndpoint``'s. Signals only set a flag; shutdown is a state machine:
``SERVING -> DRAINING`` (new work refused, in-flight work may finish) ``-> STOPPING`` (the rest
is aborted with ``finish_reason="shutdown"``, children stopped by the ladder) ``-> STOPPED``.
"""

from __future__ import annotations

import enum
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq

import harli
from harli.arena.cuda import CudaArena
from harli.arena.shm import Arena, ArenaError, ShmArena, remove_stale_arenas
from harli.config import ENV, HarliConfig, child_environ
from harli.cpu_plan import cpu_levels
from harli.daemon.control_endpoint import ControlEndpoint
from harli.daemon.frontend import Frontend
from harli.daemon.gpu_faults import FaultContainment
from harli.daemon.job_manager import JobManager
from harli.daemon.latency import LatencyTracker
from harli.daemon.memory import MemoryManager
from harli.daemon.metrics import Metrics
from harli.daemon.mps import MpsError, control_for, cuda_host, terminate_hook
from harli.daemon.quota_scheduler import QuotaScheduler
from harli.daemon.sdnotify import Notifier
from harli.daemon.supervisor import (
    Child,
    ChildExited,
    ChildFatal,
    ChildState,
    PopenOps,
    ProcessOps,
)
from harli.daemon.weights_relay import WeightsRelay
from harli.ipc import curve
from harli.ipc.codec import DecodeFailure, Decoder, encode
from harli.ipc.control import ChildStatus, DaemonStatus
from harli.ipc.decode import (
    BlocksLent,
    BlocksReturned,
    DaemonToDecode,
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
    DaemonToFinetune,
    FinetuneFatal,
    FinetuneReady,
    FinetuneShutdown,
    FinetuneToDaemon,
    JobEnded,
    JobStarted,
    LeaseReturned,
    MicroStepReport,
)
from harli.ipc.inference import ErrorCode
from harli.ipc.weights import WeightsExported
from harli.predictor import ProfileError
from harli.runtime import decode_cores, format_cpu_list, pin_to

logger = logging.getLogger(__name__)

# Messages up to this multiple of max_message_bytes reach us and get a typed "too_large" reply;
# libzmq drops the connection of a peer that sends more (ZMQ_MAXMSGSIZE), before we see it.
HARD_LIMIT_FACTOR = 4
_DRAIN_BATCH = 256


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
        self.runtime: RuntimeInfo | None = None
        self.notifier = Notifier(ENV.notify_socket)
        self._stop_signal: str | None = None
        self._drain_deadline = 0.0
        self._decode_decoder: Decoder[DecodeToDaemon] = Decoder(DecodeToDaemon)
        self._telemetry_decoder: Decoder[IterationTelemetry] = Decoder(IterationTelemetry)
        self.last_telemetry: IterationTelemetry | None = None
        self.iterations_seen = 0
        self._init_dirs()
        self._init_arena()
        try:
            self._init_sockets()
        except BaseException:
            if self.arena is not None:
                self.arena.close()
            raise
        self._init_cpu_affinity()
        self._finetune_decoder: Decoder[FinetuneToDaemon] = Decoder(FinetuneToDaemon)
        self.metrics = Metrics()
        self.jobs = JobManager(cfg, self._send_finetune, self.metrics)
        # CUDA hosts: the finetune builds its model on views of decode's weights.
        self.weights = WeightsRelay(cfg.gpu.share_weights and cfg.finetune.enabled
                                    and self.cuda_host)
        self.jobs.may_start_job = self._may_start_job
        self.finetune_quota = ""  # as the finetune reports it in FinetuneReady
        self.control_endpoint = ControlEndpoint(self.control, self.jobs,
                                                cfg.endpoints.max_message_bytes, self.status,
                                                self._set_policy)
        self.frontend = Frontend(
            self.frontend_sock, cfg, self.metrics, send_decode=self._send_decode,
            decode_running=lambda: self.decode.state is ChildState.RUNNING,
            decode_incarnation=lambda: self.decode.incarnation,
            runtime=lambda: self.runtime,
            accepting=lambda: self.state in (DaemonState.STARTING, DaemonState.SERVING),
            clock=self.clock)
        arena_arg = msgspec.json.encode(self.arena.handle).decode() if self.arena else ""
        # MPS (CUDA hosts, gpu.mps != off): both children become clients of one server; the
        # control daemon starts in run(), before them.
        self.mps = control_for(cfg.gpu, cfg.runtime_dir)
        self.faults = FaultContainment(self.mps.new_server_log) if self.mps else None
        self.finetune: Child | None = None
        if cfg.finetune.enabled:
            self.finetune = Child(
                "finetune",
                lambda inc: [sys.executable, "-m", "harli.finetune_proc", "--incarnation",
                             str(inc), "--config-json", cfg.to_json().decode(),
                             "--arena", arena_arg,
                             "--decode-cores", format_cpu_list(self.decode_cores)],
                self._child_env("finetune"), cfg.supervisor, ops or PopenOps())
        self.decode = Child(
            "decode",
            lambda inc: [sys.executable, "-m", "harli.decode_proc", "--incarnation", str(inc),
                         "--config-json", cfg.to_json().decode(),
                         "--cpu-cores", format_cpu_list(self.decode_cores),
                         "--arena", arena_arg],
            self._child_env("decode"), cfg.supervisor, ops or PopenOps())
        for child in (self.decode, self.finetune):
            if self.mps is not None and child is not None:  # terminate_client, then signal
                child.before_signal = terminate_hook(self.mps)
        self.latency: LatencyTracker | None = None  # loaded in run(), once the model exists
        self.scheduler: QuotaScheduler | None = None  # with the predictor it decides from
        self.memory: MemoryManager | None = None
        if self.arena is not None:
            self.memory = MemoryManager(cfg.memory, self.arena.handle.num_pages,
                                        self.arena.handle.page_bytes, self._send_decode,
                                        self._send_finetune, self._kill_finetune, self.metrics)
            self.decode.may_start = self.memory.may_start_decode
        for child in (self.decode, self.finetune):  # read at scrape time, not in the loop
            if child is not None:
                self.metrics.child_restarts.labels(child.name).set_function(
                    _restarts_of(child))
                self.metrics.child_forced_restarts.labels(child.name).set_function(
                    _restarts_of(child, forced=True))

    # -- setup -------------------------------------------------------------------------------

    def _init_arena(self) -> None:
        self.cuda_host = cuda_host()
        # Closed in _close(), after both children have exited: a CUDA arena's creator must
        # outlive its importers (cudaFree before their cudaIpcCloseMemHandle is undefined).
        self.arena: Arena | None = None
        if not self.cfg.memory.arena:
            return
        if self.cuda_host:
            # Device memory shared by a CUDA IPC handle (cuda-python; the daemon loads no
            # torch). Its CUDA context is created here, before the MPS control daemon starts,
            # so it is not an MPS client; IPC between MPS and non-MPS contexts is supported on
            # Volta and later (MPS doc, "Application Considerations"). Not yet run on a GPU.
            self.arena = CudaArena.create(self.cfg.arena_bytes, self.cfg.memory.page_bytes)
            return
        removed = remove_stale_arenas()
        if removed:
            logger.info("[daemon] removed arenas of dead daemons: %s", removed)
        self.arena = ShmArena.create(f"harli-{os.getpid()}-arena", self.cfg.arena_bytes,
                                     self.cfg.memory.page_bytes)
        logger.info("[daemon] arena %s: %.2f GiB in %d pages", self.arena.handle.name,
                    self.cfg.arena_bytes / 2**30, self.arena.handle.num_pages)

    def _init_cpu_affinity(self) -> None:
        # The decode engine gets its cores to itself; the daemon's per-token routing runs on
        # the others, so that it never preempts an engine step (measured on 2 cores: unpinned,
        # an iteration took 10-20 % longer while the daemon and clients streamed its tokens).
        allowed = os.sched_getaffinity(0)
        self.decode_cores = decode_cores(self.cfg.decode.cpu_cores, self.cfg.decode.cpu_threads,
                                         allowed)
        if self.decode_cores:
            pin_to(allowed - self.decode_cores or None, "daemon")
        # The finetune's quota as the finetune computes it, to fence it off decode's cores the
        # moment its level drops (see CpuQuota.fence).
        # On a GPU host the finetune's quota is SMs, not cores: no fence.
        self.cpu_fence = cpu_levels(self.cfg.finetune.levels, self.cfg.finetune.max_threads,
                                   frozenset(allowed), frozenset(self.decode_cores or ())) \
            if self.decode_cores and not self.cuda_host else None

    def _init_dirs(self) -> None:
        # File permissions on the runtime dir are the access control of the ipc:// sockets.
        self.cfg.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _init_sockets(self) -> None:
        self.ctx = zmq.Context()
        limit = self.cfg.endpoints.max_message_bytes
        self.frontend_sock = self.ctx.socket(zmq.ROUTER)
        self.frontend_sock.setsockopt(zmq.MAXMSGSIZE, HARD_LIMIT_FACTOR * limit)
        # Fail fast (EHOSTUNREACH) on a reply to a client that has gone, so its requests are
        # aborted instead of generating for nobody.
        self.frontend_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend_sock.setsockopt(zmq.SNDHWM, 100_000)
        self.frontend_sock.setsockopt(zmq.LINGER, 1000)
        self.decode_in = self.ctx.socket(zmq.PUSH)
        self.decode_in.setsockopt(zmq.SNDHWM, 100_000)
        self.decode_in.setsockopt(zmq.LINGER, 0)
        self.decode_out = self.ctx.socket(zmq.PULL)
        self.telemetry = self.ctx.socket(zmq.SUB)
        self.telemetry.setsockopt(zmq.SUBSCRIBE, b"")
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.MAXMSGSIZE, HARD_LIMIT_FACTOR * limit)
        self.control.setsockopt(zmq.LINGER, 500)
        self.finetune_in = self.ctx.socket(zmq.PUSH)
        self.finetune_in.setsockopt(zmq.LINGER, 0)
        self.finetune_out = self.ctx.socket(zmq.PULL)
        self._auth: Any = None
        ep_cfg = self.cfg.endpoints
        for sock, ep in ((self.frontend_sock, self.cfg.inference_endpoint),
                         (self.control, self.cfg.control_endpoint)):
            if ep.startswith("tcp://"):
                curve.apply_server(sock, ep_cfg.curve_server_key)
                if ep_cfg.curve_authorized_keys and self._auth is None:
                    self._auth = curve.start_authenticator(self.ctx,
                                                           ep_cfg.curve_authorized_keys)
        self._bound: list[str] = []
        for sock, ep in ((self.frontend_sock, self.cfg.inference_endpoint),
                         (self.control, self.cfg.control_endpoint),
                         (self.decode_in, self.cfg.internal_endpoint("decode-in")),
                         (self.decode_out, self.cfg.internal_endpoint("decode-out")),
                         (self.finetune_in, self.cfg.internal_endpoint("finetune-in")),
                         (self.finetune_out, self.cfg.internal_endpoint("finetune-out"))):
            sock.bind(ep)
            self._bound.append(ep)
        # decode_proc binds the telemetry PUB (so any local observer can subscribe); ZMQ
        # reconnects to the same path across decode restarts.
        self.telemetry.connect(self.cfg.internal_endpoint("telemetry"))
        self.poller = zmq.Poller()
        for s in (self.frontend_sock, self.decode_out, self.telemetry, self.control,
                  self.finetune_out):
            self.poller.register(s, zmq.POLLIN)
        logger.info("[daemon] serving inference on %s", self.cfg.inference_endpoint)

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: only records the request."""
        self._stop_signal = reason

    def run(self) -> int:
        try:
            self._prepare_model()
            if self.cfg.metrics.port:
                self.metrics.serve(self.cfg.metrics.addr, self.cfg.metrics.port)
            if self.mps is not None:
                self.mps.start()  # a CUDA program looks for MPS once, at cuInit
            self.decode.start(self.clock())
            if self.finetune is not None:
                self.finetune.start(self.clock())
            # The start-up heap (config, profile samples, imports) lives as long as the daemon:
            # out of the collector's reach, a full collection no longer walks it in the middle
            # of a scheduling decision (what vLLM's engine core does with freeze_gc_heap).
            gc.collect()
            gc.freeze()
            while self.state is not DaemonState.STOPPED:
                self._poll_once()
                self._tick(self.clock())
        finally:
            self._close()
        return self.exit_code

    def _prepare_model(self) -> None:
        if not self.cfg.model.path:
            from harli.model.tiny import ensure_tiny

            ensure_tiny(self.cfg.model_path, self.cfg.model.tiny_seed)
        # After the model exists: the profile's key names the model's config digest.
        self.latency = LatencyTracker.load(self.cfg, self.metrics)
        if self.finetune is not None:
            # Levels that only idle more than a higher one on the same threads and cores
            # are not worth a rate trial (CPU hosts; a GPU level's SMs differ at every level).
            # Without a fence decode is unpinned: the finetune's quota spans the same cores.
            dominated = [] if self.cuda_host else (self.cpu_fence or cpu_levels(
                self.cfg.finetune.levels, self.cfg.finetune.max_threads,
                frozenset(os.sched_getaffinity(0)), frozenset())).dominated_by()
            self.scheduler = QuotaScheduler(
                self.cfg.scheduler, self.cfg.finetune.levels, self.latency.model,
                self._set_level, lambda: self.jobs.decision.level, self.metrics,
                self.cfg.decode.max_num_batched_tokens or 2048, dominated)
            self.frontend.scheduler = self.scheduler  # arrivals, token gaps, finished requests
            logger.info("[scheduler] policy %s, TPOT SLO %.1f ms at %.1f%%",
                        self.cfg.scheduler.policy, self.cfg.scheduler.tpot_slo_ms,
                        100 * self.cfg.scheduler.attainment)

    def _set_level(self, level: int) -> None:
        before = self.jobs.decision.level
        self.jobs.set_level(level)
        proc = self.finetune.proc if self.finetune is not None else None
        if self.cpu_fence is not None and level < before and proc is not None \
                and self.finetune is not None and self.finetune.state is ChildState.RUNNING \
                and self.cpu_fence.fence(proc.pid, before, level):
            self.metrics.cpu_fences.inc()

    def _poll_once(self) -> None:
        events = dict(self.poller.poll(timeout=max(1, int(self.cfg.daemon.tick_s * 1000))))
        if self.decode_out in events:
            self._drain(self.decode_out, self._on_decode_message)
        if self.telemetry in events:
            self._drain(self.telemetry, self._on_telemetry)
        if self.frontend_sock in events:
            self.frontend.drain()
        if self.finetune_out in events:
            self._drain(self.finetune_out, self._on_finetune_message)
        if self.control in events:
            self.control_endpoint.drain()

    def _tick(self, now: float) -> None:
        if self.finetune is not None:
            for fev in self.finetune.transition(now):
                if isinstance(fev, ChildExited):
                    self.jobs.on_exit(fev)
                    self._check_gpu_fault(fev)
                    if self.scheduler is not None:
                        self.scheduler.on_step_gap(now, same_job=False)  # nothing in flight
                    if self.memory is not None:
                        self.memory.on_finetune_exit(now)
                elif isinstance(fev, ChildFatal):
                    logger.error("[daemon] finetune process is FATAL; jobs stay queued")
        if self.state is DaemonState.SERVING:
            self.jobs.tick()
        if self.memory is not None:
            self.memory.tick(now)
        if self.scheduler is not None and not self.frontend.requests:
            self.scheduler.on_idle(now)
        self.control_endpoint.reply_done()
        for ev in self.decode.transition(now):
            if isinstance(ev, ChildExited):
                self._on_decode_exit(ev)
                self._check_gpu_fault(ev)
            elif isinstance(ev, ChildFatal):
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

    def _begin_drain(self, now: float, reason: str) -> None:
        if self.state in (DaemonState.DRAINING, DaemonState.STOPPING, DaemonState.STOPPED):
            return
        logger.info("[shutdown] daemon: %s; draining %d requests (up to %.1f s)", reason,
                    len(self.frontend.requests), self.cfg.daemon.drain_timeout_s)
        self.notifier.stopping()
        self.state = DaemonState.DRAINING
        self._drain_deadline = now + self.cfg.daemon.drain_timeout_s

    def _stop_all(self) -> None:
        self.state = DaemonState.STOPPING
        self.frontend.finish_all("shutdown")
        if self.finetune is not None:  # reverse dependency order: finetune before decode
            self.finetune.stop(self._send_finetune_shutdown)
        self.decode.stop(self._send_decode_shutdown)
        self.state = DaemonState.STOPPED

    def _send_finetune_shutdown(self) -> None:
        self._send_finetune(FinetuneShutdown(reason="daemon stopping"))

    def _send_decode_shutdown(self) -> None:
        self._send_decode(Shutdown(reason="daemon stopping"))

    def _close(self) -> None:
        for child in (self.finetune, self.decode):  # after an exception: never leave a child
            if child is not None and child.proc is not None:
                child.stop(None)
        if self.mps is not None:
            self.mps.stop()  # after its clients; only a daemon we started
        self.jobs.close()
        if self.arena is not None:
            self.arena.close()  # the creator unlinks it
        self.poller = zmq.Poller()
        for s in (self.frontend_sock, self.control, self.decode_in, self.decode_out,
                  self.telemetry, self.finetune_in, self.finetune_out):
            s.close(linger=0 if s not in (self.frontend_sock, self.control) else 500)
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()
        for ep in [*self._bound, self.cfg.internal_endpoint("telemetry")]:
            if ep.startswith("ipc://"):
                Path(ep[len("ipc://"):]).unlink(missing_ok=True)
        logger.info("[shutdown] daemon stopped (exit %d)", self.exit_code)

    # -- socket plumbing ---------------------------------------------------------------------

    @staticmethod
    def _drain(sock: zmq.Socket[Any], handle: Callable[[bytes], None]) -> None:
        for _ in range(_DRAIN_BATCH):
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(data)

    def _send_finetune(self, msg: DaemonToFinetune) -> bool:
        try:
            self.finetune_in.send(encode(msg), zmq.NOBLOCK)
            return True
        except zmq.Again:  # finetune_proc not connected (yet)
            return False

    # -- finetune_proc -----------------------------------------------------------------------

    def _on_finetune_message(self, data: bytes) -> None:
        try:
            msg = self._finetune_decoder.decode(data)
        except DecodeFailure as e:
            logger.error("[daemon] undecodable message from finetune_proc: %s", e)
            return
        if isinstance(msg, FinetuneReady):
            assert self.finetune is not None
            if self.finetune.on_ready(msg.incarnation, self.clock()):
                self.finetune_quota = msg.quota
                logger.info("[daemon] finetune[%d] quota: %s", msg.incarnation,
                            msg.quota or "-")
                self.weights.relay(msg.incarnation, self._send_finetune)  # before any job
                self.jobs.on_ready()
            return
        if isinstance(msg, LeaseReturned):
            if self.memory is not None:
                self.memory.on_lease_returned(msg, self.clock())
            return
        if isinstance(msg, FinetuneFatal):
            self._check_gpu_fault(msg, "finetune")
        self.jobs.on_message(msg)
        if isinstance(msg, MicroStepReport):
            if self.scheduler is not None:
                self.scheduler.on_micro_step(msg, self.clock())
            if self.memory is not None:
                self.memory.on_micro_step(msg)
            return
        if self.scheduler is not None and isinstance(msg, JobStarted | JobEnded
                                                     | CheckpointSaved):
            self.scheduler.on_step_gap(self.clock(), same_job=isinstance(msg, CheckpointSaved))
        if self.memory is not None and isinstance(msg, JobStarted | JobEnded):
            self.memory.set_finetune_training(isinstance(msg, JobStarted), self.clock())

    def _may_start_job(self) -> bool:
        if self.finetune is None:
            return True
        return self.weights.may_start_job(self.finetune.incarnation,
                                          self.runtime.device if self.runtime else None)

    def finetune_level(self) -> int:
        """The quota level the finetune runs at now (0 when no job is training)."""
        d = self.jobs.decision
        return d.level if d.admitted and self.jobs.running is not None else 0

    def status(self) -> DaemonStatus:
        """What ``harli status`` shows (the control API's ``GetStatus``)."""
        children = [ChildStatus(name=c.name, state=c.state.value, incarnation=c.incarnation,
                                restarts=c.restarts, pid=c.proc.pid if c.proc else None,
                                forced_restarts=c.forced_restarts)
                    for c in (self.decode, self.finetune) if c is not None]
        info = self.jobs.info()
        return DaemonStatus(state=self.state.value, pid=os.getpid(), children=children,
                            model=self.runtime.model if self.runtime else None,
                            decode_iterations=self.iterations_seen,
                            memory=self.memory.status() if self.memory else None,
                            job_running=info["running"], jobs_queued=info["queued"],
                            level=self.jobs.decision.level,
                            predictor=self.latency.status() if self.latency else None,
                            scheduler=self.scheduler.status() if self.scheduler else None,
                            finetune_quota=self.finetune_quota)

    def _set_policy(self, spec: str, tpot_slo_ms: float | None = None) -> None:
        if self.scheduler is None:
            raise ValueError("no finetune process (finetune.enabled = false): no quota to set")
        self.scheduler.set_policy(spec, self.clock(), tpot_slo_ms)

    def _kill_finetune(self, reason: str) -> None:
        if self.finetune is not None:
            self.finetune.kill(reason)

    def _send_decode(self, msg: DaemonToDecode) -> bool:
        try:
            self.decode_in.send(encode(msg), zmq.NOBLOCK)
            return True
        except zmq.Again:  # decode_proc not connected (yet); the caller retries
            return False

    # -- decode_proc -------------------------------------------------------------------------

    def _on_decode_message(self, data: bytes) -> None:
        try:
            msg = self._decode_decoder.decode(data)
        except DecodeFailure as e:
            logger.error("[daemon] undecodable message from decode_proc: %s", e)
            return
        if isinstance(msg, StepOutputs):
            self.frontend.on_step_outputs(msg)
        elif isinstance(msg, Ready):
            self._on_ready(msg)
        elif isinstance(msg, BlocksLent):
            if self.memory is not None:
                self.memory.on_blocks_lent(msg, self.clock())
        elif isinstance(msg, BlocksReturned):
            if self.memory is not None:
                self.memory.on_blocks_returned(msg)
        elif isinstance(msg, WeightsExported):
            self._on_weights_exported(msg)
        elif isinstance(msg, Fatal):
            logger.error("[daemon] decode[%d] reported a fatal error: %s\n%s", msg.incarnation,
                         msg.error, msg.traceback)
            self._check_gpu_fault(msg, "decode")

    def _on_weights_exported(self, msg: WeightsExported) -> None:
        if self.weights.on_exported(msg, self.decode.incarnation) and self.finetune is not None \
                and self.finetune.state is ChildState.RUNNING:
            self.weights.relay(self.finetune.incarnation, self._send_finetune)

    def _on_ready(self, msg: Ready) -> None:
        if not self.decode.on_ready(msg.incarnation, self.clock()):
            return
        self.runtime = msg.info
        if self.memory is not None:
            self.memory.on_decode_ready(msg.incarnation, msg.info, self.clock())
        if self.state is DaemonState.STARTING:
            self.state = DaemonState.SERVING
            self.notifier.ready(f"serving {msg.info.model}")
        self.frontend.dispatch_pending()

    def _on_decode_exit(self, ev: ChildExited) -> None:
        if self.memory is not None:
            self.memory.on_decode_exit(self.clock())
        self.frontend.on_decode_exit(ev)
        restart = self.weights.on_decode_exit(
            self.finetune.incarnation if self.finetune is not None else None,
            self.jobs.running is not None)
        if restart is not None and self.finetune is not None:
            # Forced: not counted toward the finetune's FATAL limit. The job manager requeues
            # its job at the exit.
            self.finetune.restart(restart)

    def _on_telemetry(self, data: bytes) -> None:
        try:
            self.last_telemetry = self._telemetry_decoder.decode(data)
            self.iterations_seen += 1
            self.metrics.on_iteration(self.last_telemetry)
            if self.memory is not None:
                self.memory.on_telemetry(self.last_telemetry)
            if self.latency is not None:
                self.latency.on_telemetry(self.last_telemetry, self.finetune_level(),
                                          self.clock())
            if self.scheduler is not None:
                self.scheduler.on_telemetry(self.last_telemetry, self.clock())
        except DecodeFailure as e:
            logger.error("[daemon] undecodable telemetry: %s", e)

    # -- MPS ---------------------------------------------------------------------------------

    def _child_env(self, role: str) -> dict[str, str]:
        env = child_environ(self.cfg, role)
        return self.mps.client_env(env, role) if self.mps is not None else env

    def _check_gpu_fault(self, what: ChildExited | Fatal | FinetuneFatal, name: str = "") -> None:
        """Under MPS a GPU fault ends every client: restart the other child too (the normal
        crash path; a finetune job resumes from its checkpoint)."""
        if self.faults is None:
            return
        children = (self.decode, self.finetune)
        if isinstance(what, ChildExited):
            decision = self.faults.on_exit(what, children)
        else:
            decision = self.faults.on_fatal(name, what.incarnation,
                                            f"{what.error}\n{what.traceback}", children)
        if decision is not None:
            decision.apply()


def _restarts_of(child: Child, forced: bool = False) -> Callable[[], float]:
    if forced:
        return lambda: float(child.forced_restarts)
    return lambda: float(child.restarts)


def run_daemon(cfg: HarliConfig) -> int:
    """Entry of ``harli daemon``: a foreground process fit for systemd."""
    from harli.runtime import configure_logging, set_title

    configure_logging("daemon", cfg.daemon.log_level)
    set_title("harli::daemon")
    try:
        daemon = Daemon(cfg)
    except ArenaError as e:
        logger.error("[daemon] cannot start: %s", e)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop("SIGINT"))
    logger.info("[daemon] harli %s pid %d, state dir %s", harli.__version__, os.getpid(),
                cfg.state_dir)
    try:
        return daemon.run()
    except (ProfileError, MpsError) as e:
        logger.error("[daemon] cannot start: %s", e)
        return 2
