"""``FinetuneProc``: the finetune process's loop around ``LoRARecipe``.

Sockets (ipc:// in the runtime dir, bound by the daemon): ``finetune-in`` PULL <- daemon
(``StartJob``, ``StopJob``, ``Decision``, ``FinetuneShutdown``, ``GrantLease``, ``ReclaimLease``,
``LeaseRefused``) and ``finetune-out`` PUSH -> daemon (``FinetuneReady``, one
``MicroStepReport`` per micro-step, ``JobStarted``, ``CheckpointSaved``, ``JobEnded``,
``FinetuneFatal``, ``LeaseReturned``). On a CUDA host with ``gpu.share_weights`` the daemon also
relays decode's ``WeightsExported`` before any ``StartJob``; the latest one is kept, and a job
builds its base model on it (``recipe.shared_base``).

Leased arena pages (``ActivationLease``) hold the tensors autograd saves during a micro-step.
Grants and reclaims are applied while draining inputs, only when the lease is empty: at
micro-step boundaries and between the chunks a micro-step runs in (``finetune.chunk_tokens``),
where a pause also takes effect: a reclaim is answered, and a drop to level 0 obeyed, within a
chunk. Inside a chunk, between the model's blocks, only a new level is applied (and a fence
the daemon put on our threads followed); other messages wait there for the chunk's end.

Loop: ``drain inputs -> (if a job is admitted) one micro-step -> emit``. Before each micro-step
it obeys the daemon's latest ``Decision``; when paused or idle it blocks on its socket (bounded),
so a new decision or a stop is seen at once.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
import traceback
from collections import deque
from collections.abc import Iterator

import msgspec
import torch
import zmq

from harli.config import HarliConfig
from harli.cpu_plan import set_process_affinity
from harli.finetune_proc.activations import ActivationLease
from harli.finetune_proc.block_hooks import call_between_blocks
from harli.finetune_proc.gpu_quota import GpuQuota, make_quota
from harli.finetune_proc.quota import CpuQuota, QuotaApplier, cpu_quota
from harli.finetune_proc.recipe import LoRARecipe, MicroStepAborted, shared_base
from harli.ipc.codec import Decoder, drain, encode
from harli.ipc.finetune import (
    CheckpointSaved,
    DaemonToFinetune,
    Decision,
    FinetuneFatal,
    FinetuneReady,
    FinetuneShutdown,
    GrantLease,
    JobEnded,
    JobStarted,
    LeaseRefused,
    LeaseReturned,
    MicroStepReport,
    ReclaimLease,
    StartJob,
    StopJob,
)
from harli.ipc.weights import WeightsExported

logger = logging.getLogger(__name__)

_IDLE_WAIT_MS = 100


def quota_description(quota: QuotaApplier) -> str:
    """``FinetuneReady.quota``: how this process's quota levels are enforced."""
    if isinstance(quota, GpuQuota):
        return json.dumps(quota.describe(), sort_keys=True)
    if isinstance(quota, CpuQuota):
        return "cpu threads+affinity"
    return type(quota).__name__


class FinetuneProc:
    def __init__(self, cfg: HarliConfig, incarnation: int, quota: QuotaApplier,
                 lease: ActivationLease | None = None, device: str = "cpu") -> None:
        self.cfg = cfg
        self.incarnation = incarnation
        self.quota = quota
        self.lease = lease
        self.device = device  # "cuda" or "cpu": where jobs train
        self.weights: WeightsExported | None = None  # decode's, as last relayed
        self.decision = Decision(level=0, admitted=False, seq=0)
        self._applied_seq = -1
        self.job: StartJob | None = None
        self.recipe: LoRARecipe | None = None
        self._stop_job: str | None = None
        self._stop_reason: str | None = None
        self._paused_since: float | None = None
        self._paused_s = 0.0
        self._idle_until = 0.0
        self._fence_follows = 0  # in the micro-step in flight
        # Messages read between blocks that only a chunk boundary may act on (all but a
        # Decision), handled first at the next drain, in the order they came.
        self._deferred: deque[DaemonToFinetune] = deque()
        self._decoder: Decoder[DaemonToFinetune] = Decoder(DaemonToFinetune)
        self._ctx = zmq.Context()
        self._in = self._ctx.socket(zmq.PULL)
        self._in.connect(cfg.internal_endpoint("finetune-in"))
        self._out = self._ctx.socket(zmq.PUSH)
        self._out.setsockopt(zmq.LINGER, 2000)
        self._out.connect(cfg.internal_endpoint("finetune-out"))

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: only records the request."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def _send(self, msg: msgspec.Struct) -> None:
        self._out.send(encode(msg))

    # -- loop ----------------------------------------------------------------------------------

    def run(self) -> None:
        self._send(FinetuneReady(incarnation=self.incarnation, pid=os.getpid(),
                                 levels=self.quota.levels,
                                 quota=quota_description(self.quota)))
        while self._stop_reason is None:
            self._drain_inputs()
            self._step()

    def _can_train(self) -> bool:
        return (self.recipe is not None and self.decision.admitted and self.decision.level > 0
                and time.monotonic() >= self._idle_until)

    def _drain_inputs(self) -> None:
        if self._can_train():
            timeout_ms = 0
        elif self.recipe is not None and self.decision.admitted:  # duty-cycle idle
            timeout_ms = max(0, int(1000 * (self._idle_until - time.monotonic())))
        else:
            timeout_ms = _IDLE_WAIT_MS
        for msg in self._inputs(timeout_ms):
            self._handle(msg)

    def _inputs(self, timeout_ms: int) -> Iterator[DaemonToFinetune]:
        """The deferred messages, then the socket's (without waiting if there were any)."""
        waiting = timeout_ms
        while self._deferred:
            waiting = 0
            yield self._deferred.popleft()
        yield from drain(self._in, self._decoder, waiting, "finetune")

    def _handle(self, msg: DaemonToFinetune) -> None:
        if isinstance(msg, Decision):
            if msg.seq >= self.decision.seq:
                self.decision = msg
        elif isinstance(msg, StartJob):
            self._start(msg)
        elif isinstance(msg, StopJob):
            if self.job is not None and msg.job_id == self.job.job_id:
                self._stop_job = msg.reason
        elif isinstance(msg, FinetuneShutdown):
            self.request_stop(msg.reason)
        elif isinstance(msg, GrantLease | ReclaimLease):
            self._on_lease(msg)
        elif isinstance(msg, LeaseRefused):
            logger.error("[finetune] the daemon refused lease message %d: %s", msg.seq,
                         msg.message)
        elif isinstance(msg, WeightsExported):
            # Used by the next job; a running one keeps the model it has (when the decode that
            # exported it exits, the daemon restarts this process).
            self.weights = msg
            logger.info("[finetune] decode[%d] shares %d weights", msg.generation,
                        len(msg.exports))

    def _on_lease(self, msg: GrantLease | ReclaimLease) -> None:
        if self.lease is None:
            logger.error("[finetune] lease message without an arena; returning the pages")
            self._send(LeaseReturned(seq=msg.seq, pages=msg.pages, reason="no arena", clean=True))
            return
        if isinstance(msg, GrantLease):
            self.lease.grant(msg.pages)
            return
        held = set(self.lease.pages)
        mine = [p for p in msg.pages if p in held]
        if mine:
            self.lease.take_back(mine)  # zeroes what our micro-steps wrote
        late = time.monotonic() - msg.deadline_s
        if late > 0:
            logger.warning("[finetune] reclaim %d answered %.3f s after its deadline", msg.seq,
                           late)
        self._send(LeaseReturned(seq=msg.seq, pages=mine, reason="reclaimed", clean=True))

    def _start(self, msg: StartJob) -> None:
        if self.job is not None:
            logger.error("[finetune] StartJob %d while job %d runs; ignored", msg.job_id,
                         self.job.job_id)
            return
        self.job = msg
        self._stop_job = None
        self._paused_s = 0.0
        self._paused_since = None
        recipe = LoRARecipe(msg.spec, msg.model_path, self.device,
                            shared_base(self.device, self.weights, msg.model_path))
        try:
            recipe.setup()
        except Exception as e:
            logger.exception("[finetune] job %d failed to set up", msg.job_id)
            self._end("failed", f"setup failed: {e}")
            return
        self.recipe = recipe
        if self.device == "cpu":
            # A level drop's fence and a new level are obeyed inside a chunk, not at its end.
            call_between_blocks(recipe.model, self._between_blocks)
        self._send(JobStarted(job_id=msg.job_id, resumed_from_step=recipe.resumed_from,
                              total_steps=recipe.total_steps,
                              dataset_report=recipe.dataset_report()))
        if recipe.done:  # resumed after its last step: only the adapter is left to write
            self._finish()

    def _end(self, status: str, error: str | None, adapter: str | None = None) -> None:
        assert self.job is not None
        self._send(JobEnded(job_id=self.job.job_id, status=status, error=error,
                            adapter_path=adapter))
        shared = self.recipe is not None and self.recipe.base_source == "decode"
        if self.recipe is not None:
            self.recipe.cleanup()
        self.job = None
        self.recipe = None
        if shared:
            # Unmap decode's weights now, not at some later collection: an idle finetune must
            # hold no view of a decode process that may exit.
            gc.collect()

    def _finish(self) -> None:
        assert self.recipe is not None
        path = self.recipe.finish()
        logger.info("[finetune] job %d done; adapter in %s", self.job.job_id if self.job else -1,
                    path)
        self._end("succeeded", None, str(path))

    def _step(self) -> None:
        if self.recipe is None or self.job is None:
            return
        if self._stop_job is not None:
            self.recipe.discard_partial_accumulation()
            self._end("cancelled", None)
            return
        now = time.monotonic()
        if not (self.decision.admitted and self.decision.level > 0):
            if self._paused_since is None:
                self._paused_since = now
            return
        if self._paused_since is not None:
            self._paused_s += now - self._paused_since
            self._paused_since = None
        if now < self._idle_until:
            return
        level = self.decision.level
        self._apply_decision()
        self._fence_follows = 0
        try:
            r = self.recipe.train_micro_step(self.lease, self._between_chunks,
                                             self._chunk_tokens)
        except MicroStepAborted as e:
            logger.info("[finetune] job %d: micro-step %d abandoned while paused (%s)",
                        self.job.job_id, self.recipe.state.micro_step + 1, e)
            self.recipe.discard_partial_accumulation()
            return
        except Exception as e:
            logger.exception("[finetune] job %d failed in a micro-step", self.job.job_id)
            self._end("failed", f"micro-step {self.recipe.state.micro_step + 1}: {e!r}")
            return
        idle_after_s = self.quota.idle_after(level, r.duration_s)
        self._idle_until = time.monotonic() + idle_after_s
        self._send(MicroStepReport(
            job_id=self.job.job_id, micro_step=r.micro_step, step=r.step, epoch=r.epoch,
            tokens=r.tokens, step_tokens=r.step_tokens, duration_s=r.duration_s, level=level,
            loss=r.loss, paused_s=self._paused_s + r.waited_s,
            total_steps=self.recipe.total_steps,
            lease_bytes=r.lease.lease_bytes if r.lease else 0,
            lease_saved_bytes=r.lease.lease_saved_bytes if r.lease else 0,
            private_saved_bytes=r.lease.private_saved_bytes if r.lease else 0,
            fallback_tensors=r.lease.fallback_tensors if r.lease else 0, chunks=r.chunks,
            idle_after_s=idle_after_s, fence_follows=self._fence_follows))
        self._paused_s = 0.0
        if self.recipe.checkpoint_due(r):
            path = self.recipe.save_checkpoint()
            self._send(CheckpointSaved(job_id=self.job.job_id, step=r.step, path=str(path)))
        if self.recipe.done:
            self._finish()

    def _apply_decision(self) -> None:
        """The quota of the latest decision, once per decision. Only a new decision re-applies
        it: the daemon may have fenced our threads off decode's cores for a newer one we have
        not read yet, and re-widening them for the old level would undo that."""
        if self.decision.seq != self._applied_seq and self.decision.level > 0:
            self.quota.apply(self.decision.level)
            self._applied_seq = self.decision.seq

    def _chunk_tokens(self) -> int:
        """The next chunk's padded tokens at the level in force (applied between chunks): a
        rise mid-micro-step gets the top level's chunks, measured ~10-25 % faster for two
        threads than the level below's (``CpuQuota.chunk_scale``)."""
        return self.cfg.finetune.chunk_tokens * self.quota.chunk_scale(
            max(1, self.decision.level))

    def _between_blocks(self) -> None:
        """Called by the training thread between its model's blocks (``block_hooks``), inside
        a chunk: follow a fence the daemon has put on our threads since (a drop), and apply a
        decision that came since (a rise: decode went idle) now rather than at the chunk's
        end. A pause and every other message wait for the chunk boundary (the lease must be
        empty to grant or reclaim pages), kept in order in ``_deferred``."""
        if self.quota.follow_fence():
            self._fence_follows += 1
        for msg in drain(self._in, self._decoder, 0, "finetune"):
            if isinstance(msg, Decision):
                self._handle(msg)
            else:
                self._deferred.append(msg)
        if self.decision.admitted and self.decision.level > 0:
            self._apply_decision()  # a seq comparison when nothing new came

    def _between_chunks(self) -> float:
        """Called by the recipe between two chunks of a micro-step, when the lease is empty and
        the finished chunks' gradients are accumulated: read the daemon's messages (a lease
        grant or reclaim is applied here and a reclaim answered at once), and while the daemon
        has the finetune paused, wait here rather than finish the micro-step beside a busy
        decode. Returns the seconds waited. A stop or cancel while paused abandons the
        micro-step; one that comes while running lets it finish, as at a boundary. A new
        level applies from the next chunk on, and sizes it (``_chunk_tokens``)."""
        t0 = time.monotonic()
        timeout_ms = 0
        while True:
            for msg in self._inputs(timeout_ms):
                self._handle(msg)
            paused = not (self.decision.admitted and self.decision.level > 0)
            stopping = self._stop_reason or self._stop_job
            if stopping and (paused or timeout_ms):
                raise MicroStepAborted(stopping)
            if not paused or stopping:
                # A level read here takes effect for the next chunk (one read inside the
                # chunk, and a drop's fence, took effect between blocks: _between_blocks).
                self._apply_decision()
                return time.monotonic() - t0 if timeout_ms else 0.0
            timeout_ms = _IDLE_WAIT_MS  # paused: block until the next message

    def report_fatal(self, exc: BaseException) -> None:
        self._send(FinetuneFatal(incarnation=self.incarnation, error=repr(exc),
                                 traceback=traceback.format_exc()))

    def close(self) -> None:
        self._out.close(linger=None)
        self._in.close(linger=0)
        self._ctx.term()


def run_finetune_proc(cfg: HarliConfig, incarnation: int, own_cores: frozenset[int],
                      spill_cores: frozenset[int], arena_json: str = "") -> int:
    """Entry of the finetune process (after ``__main__``'s set-up); returns its exit code.
    ``own_cores``: where it trains up to the levels that spill onto decode's ``spill_cores``."""
    from harli.runtime import run_child

    # Off decode's cores now that libgomp has read the wide mask (openmp_start_mask).
    if spill_cores and own_cores:
        set_process_affinity(own_cores)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Before anything else touches CUDA: a fallback MPS percentage takes effect only if it is
    # in the environment when the CUDA context is created (start_gpu_quota).
    quota = make_quota(cfg, device, lambda: cpu_quota(
        cfg.finetune.levels, cfg.finetune.max_threads, own_cores, spill_cores))
    lease = None
    if arena_json:
        from harli.arena.cuda import open_arena
        from harli.ipc.arena import ArenaHandle

        handle = msgspec.json.decode(arena_json, type=ArenaHandle)
        # No prefault: the pages are decode's, resident already; only leased ones are touched.
        lease = ActivationLease(open_arena(handle, prefault=False), handle.page_bytes)
    return run_child("finetune", FinetuneProc(cfg, incarnation, quota, lease, device))
