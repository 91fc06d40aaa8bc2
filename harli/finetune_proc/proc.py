"""``FinetuneProc``: the finetune process's loop around ``LoRARecipe``.

Sockets (ipc:// in the runtime dir, bound by the daemon): ``finetune-in`` PULL <- daemon
(``StartJob``, ``StopJob``, ``Decision``, ``FinetuneShutdown``, ``GrantLease``, ``ReclaimLease``,
``LeaseRefused``), read only by the ``Inbox``, and ``finetune-out`` PUSH -> daemon
(``FinetuneReady``, ``JobStarted``, one ``MicroStepReport`` per micro-step, ``StepLogged`` per
logged step, ``CheckpointSaved``, ``JobEnded``, ``FinetuneFatal``, ``LeaseReturned``). On a CUDA
host with ``gpu.share_weights`` the daemon also relays decode's ``WeightsExported`` before any
``StartJob``; the latest one is kept, and a job builds its base model on it
(``recipe.shared_base``).

Loop: ``drain inputs -> step -> emit``. Draining reads the socket into the inbox, waiting
(bounded) only when there is nothing to train, so that a new decision or a stop is seen at
once. A step acts on the queued messages, then does the job's next piece of work: set it up,
end it, or train one micro-step while the daemon's latest ``Decision`` admits it. What a step
yields is emitted at once, also from inside a micro-step.

Inside a micro-step the process acts at two kinds of points, because leased arena pages
(``ActivationLease``) hold the tensors autograd saves there and may change hands only while
the lease is empty:

- between two chunks (``finetune.chunk_tokens``), where the recipe's ``MicroStep`` yields:
  every queued message is handled (a lease grant or reclaim is applied, a reclaim answered),
  the level in force is applied and sizes the next chunk, and while the daemon has the
  finetune paused the process waits there rather than finish the micro-step beside a busy
  decode. Scoring a checkpoint on the job's validation file stops at the same kind of point
  between two of its batches;
- between the model's blocks inside a chunk (CPU only, ``block_hooks``): a fence the daemon
  put on our threads is followed, and a new level (a rise: decode went idle) is applied now
  rather than at the chunk's end. Every other message waits in the inbox for the boundary.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Generator, Iterator
from typing import Any

import zmq

from harli.config import HarliConfig
from harli.datasets import TokenizedCache
from harli.finetune_proc.activations import ActivationLease
from harli.finetune_proc.block_hooks import call_between_blocks
from harli.finetune_proc.gpu_quota import GpuQuota
from harli.finetune_proc.inbox import Inbox
from harli.finetune_proc.quota import CpuQuota, QuotaApplier
from harli.finetune_proc.recipe import LoRARecipe, MicroStepResult, shared_base
from harli.ipc.codec import encode
from harli.ipc.finetune import (
    STOPPED,
    CheckpointSaved,
    DaemonToFinetune,
    Decision,
    FinetuneFatal,
    FinetuneReady,
    FinetuneShutdown,
    FinetuneToDaemon,
    GrantLease,
    JobEnded,
    JobStarted,
    LeaseRefused,
    LeaseReturned,
    MicroStepReport,
    ReclaimLease,
    StartJob,
    StepLogged,
    StopJob,
    ValidationScore,
)
from harli.ipc.weights import WeightsExported

logger = logging.getLogger(__name__)

_IDLE_WAIT_MS = 100  # the longest a paused or idle finetune waits before it looks again


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
        self._applied_seq = -1  # the decision whose level the quota was last set to
        self.job: StartJob | None = None
        self.recipe: LoRARecipe | None = None  # None while the job is not set up yet
        self._stop_job: str | None = None
        # The stop asked for is a pause (StopJob.keep_progress): checkpoint, end ``stopped``.
        self._stop_keeps_progress = False
        # A micro-step was abandoned after such a stop, and with it the gradients of the
        # accumulation under way: that accumulation cannot be finished any more.
        self._accumulation_dropped = False
        self._stop_reason: str | None = None
        self._paused_since: float | None = None
        self._paused_s = 0.0
        self._idle_until = 0.0
        self._fence_follows = 0  # in the micro-step in flight
        self._handlers: dict[type, Callable[[Any], FinetuneToDaemon | None]] = {
            StartJob: self._start, StopJob: self._on_stop_job,
            FinetuneShutdown: self._on_shutdown, GrantLease: self._on_lease,
            ReclaimLease: self._on_lease, LeaseRefused: self._on_lease_refused,
            WeightsExported: self._on_weights}
        self._ctx = zmq.Context()
        self.inbox = Inbox(self._ctx, cfg.internal_endpoint("finetune-in"))
        self._out = self._ctx.socket(zmq.PUSH)
        self._out.setsockopt(zmq.LINGER, 2000)
        self._out.connect(cfg.internal_endpoint("finetune-out"))

    @property
    def decision(self) -> Decision:
        """The daemon's latest decision (kept by the inbox)."""
        return self.inbox.decision

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: only records the request."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def _emit(self, msg: FinetuneToDaemon) -> None:
        self._out.send(encode(msg))

    # -- loop ----------------------------------------------------------------------------------

    def run(self) -> None:
        self._emit(FinetuneReady(incarnation=self.incarnation, pid=os.getpid(),
                                 levels=self.quota.levels,
                                 quota=quota_description(self.quota)))
        while self._stop_reason is None:
            self._drain_inputs()
            for msg in self._step():
                self._emit(msg)

    def _admitted(self) -> bool:
        return self.decision.admitted and self.decision.level > 0

    def _drain_inputs(self) -> None:
        """Read the daemon's messages: without waiting while there is training to do, until
        the duty cycle's idle ends when in it, and otherwise (paused, or no job) for the next
        message, bounded."""
        if self.recipe is not None and self._admitted():
            timeout_ms = max(0, int(1000 * (self._idle_until - time.monotonic())))
        else:
            timeout_ms = _IDLE_WAIT_MS
        self.inbox.drain(timeout_ms)

    def _step(self) -> Iterator[FinetuneToDaemon]:
        """Act on the queued messages, then do the job's next piece of work; yields what is
        to be sent, each as soon as it is due."""
        yield from self._handle_queued()
        if self.job is None:
            return
        if self.recipe is None:
            yield from self._set_up(self.job)
            return
        if self._stop_job is not None and not self._finishes_accumulation(self.recipe):
            yield from self._stop(self.recipe, self.job)
            return
        now = time.monotonic()
        if not self._admitted():
            if self._paused_since is None:
                self._paused_since = now
            return
        if self._paused_since is not None:
            self._paused_s += now - self._paused_since
            self._paused_since = None
        if now < self._idle_until:
            return
        yield from self._train_micro_step(self.recipe, self.job)

    # -- messages ------------------------------------------------------------------------------

    def _handle_queued(self) -> Iterator[FinetuneToDaemon]:
        for msg in self.inbox.take():
            reply = self._handle(msg)
            if reply is not None:
                yield reply

    def _handle(self, msg: DaemonToFinetune) -> FinetuneToDaemon | None:
        """Act on one message; returns the reply due at once, if any."""
        handler = self._handlers.get(type(msg))
        if handler is None:  # a Decision: the inbox keeps those apart
            logger.error("[finetune] no handler for %s; ignored", type(msg).__name__)
            return None
        return handler(msg)

    def _on_stop_job(self, msg: StopJob) -> None:
        if self.job is None or msg.job_id != self.job.job_id:
            return
        if not msg.keep_progress:  # a cancel outranks a pause asked for before it
            self._stop_job, self._stop_keeps_progress = msg.reason, False
        elif self._stop_job is None:
            self._stop_job, self._stop_keeps_progress = msg.reason, True

    def _on_shutdown(self, msg: FinetuneShutdown) -> None:
        self.request_stop(msg.reason)

    def _on_lease_refused(self, msg: LeaseRefused) -> None:
        logger.error("[finetune] the daemon refused lease message %d: %s", msg.seq, msg.message)

    def _on_weights(self, msg: WeightsExported) -> None:
        # Used by the next job; a running one keeps the model it has (when the decode that
        # exported it exits, the daemon restarts this process).
        self.weights = msg
        logger.info("[finetune] decode[%d] shares %d weights", msg.generation, len(msg.exports))

    def _on_lease(self, msg: GrantLease | ReclaimLease) -> LeaseReturned | None:
        if self.lease is None:
            logger.error("[finetune] lease message without an arena; returning the pages")
            return LeaseReturned(seq=msg.seq, pages=msg.pages, reason="no arena", clean=True)
        if isinstance(msg, GrantLease):
            self.lease.grant(msg.pages)
            return None
        held = set(self.lease.pages)
        mine = [p for p in msg.pages if p in held]
        if mine:
            self.lease.take_back(mine)  # zeroes what our micro-steps wrote
        late_s = time.monotonic() - msg.deadline_s
        if late_s > 0:
            logger.warning("[finetune] reclaim %d answered %.3f s after its deadline", msg.seq,
                           late_s)
        return LeaseReturned(seq=msg.seq, pages=mine, reason="reclaimed", clean=True)

    def _start(self, msg: StartJob) -> None:
        """Admit the job; the next step sets it up."""
        if self.job is not None:
            logger.error("[finetune] StartJob %d while job %d runs; ignored", msg.job_id,
                         self.job.job_id)
            return
        self.job = msg
        self._stop_job = None
        self._stop_keeps_progress = False
        self._accumulation_dropped = False
        self._paused_s = 0.0
        self._paused_since = None

    # -- the job -------------------------------------------------------------------------------

    def _set_up(self, job: StartJob) -> Iterator[FinetuneToDaemon]:
        recipe = LoRARecipe(job.spec, job.model_path, self.device,
                            shared_base(self.device, self.weights, job.model_path),
                            TokenizedCache(self.cfg.dataset_cache_dir))
        try:
            recipe.setup()
        except Exception as e:
            logger.exception("[finetune] job %d failed to set up", job.job_id)
            yield self._end("failed", f"setup failed: {e}")
            return
        self.recipe = recipe
        if self.device == "cpu":
            # A level drop's fence and a new level are obeyed inside a chunk, not at its end.
            call_between_blocks(recipe.model, self._between_blocks)
        yield JobStarted(job_id=job.job_id, resumed_from_step=recipe.resumed_from,
                         total_steps=recipe.total_steps, dataset_report=recipe.dataset_report())
        if recipe.done:  # resumed after its last step: only the adapter is left to write
            yield self._finish()

    def _finishes_accumulation(self, recipe: LoRARecipe) -> bool:
        """Whether a pause asked for waits for the optimizer step under way: while the job
        may train, a pause loses no gradient accumulation (a cancel never waits)."""
        return (self._stop_keeps_progress and not recipe.at_step_boundary
                and not self._accumulation_dropped and self._admitted())

    def _stop(self, recipe: LoRARecipe, job: StartJob) -> Iterator[FinetuneToDaemon]:
        """End the job for a stop: a cancel at once; a pause after a checkpoint of its last
        optimizer step (none when one of that step exists already, or none is done), so that
        it resumes where it stopped. Partway through an accumulation (the quota gives it
        nothing now), the partial accumulation is dropped: it resumes from its last
        checkpoint."""
        if not self._stop_keeps_progress:
            recipe.discard_partial_accumulation()
            yield self._end("cancelled", None)
            return
        error = None
        if not recipe.at_step_boundary:
            recipe.discard_partial_accumulation()
            error = (f"paused partway through step {recipe.state.step + 1} with no compute "
                     f"to finish it; resumes from its last checkpoint")
        elif recipe.state.step > 0 and not recipe.has_checkpoint(recipe.state.step):
            try:
                path = recipe.save_checkpoint()
            except Exception as e:
                logger.exception("[finetune] job %d: the pause's checkpoint failed", job.job_id)
                error = f"the pause's checkpoint failed ({e!r}); resumes from its last one"
            else:
                yield CheckpointSaved(job_id=job.job_id, step=recipe.state.step,
                                      path=str(path), epoch=recipe.epoch_progress)
        logger.info("[finetune] job %d stopped at step %d (%s)", job.job_id, recipe.state.step,
                    self._stop_job)
        yield self._end(STOPPED, error)

    def _end(self, status: str, error: str | None, adapter: str | None = None) -> JobEnded:
        assert self.job is not None
        ended = JobEnded(job_id=self.job.job_id, status=status, error=error,
                         adapter_path=adapter)
        shared = self.recipe is not None and self.recipe.base_source == "decode"
        if self.recipe is not None:
            self.recipe.cleanup()
        self.job = None
        self.recipe = None
        if shared:
            # Unmap decode's weights now, not at some later collection: an idle finetune must
            # hold no view of a decode process that may exit.
            gc.collect()
        return ended

    def _finish(self) -> JobEnded:
        assert self.recipe is not None and self.job is not None
        path = self.recipe.finish()
        logger.info("[finetune] job %d done; adapter in %s", self.job.job_id, path)
        return self._end("succeeded", None, str(path))

    def _train_micro_step(self, recipe: LoRARecipe,
                          job: StartJob) -> Iterator[FinetuneToDaemon]:
        """One micro-step at the decided level; then its report, a checkpoint when one is
        due, and the job's end after its last step."""
        level = self.decision.level
        self._apply_decision()
        self._fence_follows = 0
        step = recipe.micro_step(self.lease, self._chunk_tokens())
        try:
            for _ in step:  # at each boundary between two chunks
                waited_s = yield from self._at_chunk_boundary()
                if waited_s is None:
                    step.close()
                    break
                step.waited_s += waited_s
                step.chunk_tokens = self._chunk_tokens()
        except Exception as e:
            logger.exception("[finetune] job %d failed in a micro-step", job.job_id)
            yield self._end("failed", f"micro-step {recipe.state.micro_step + 1}: {e!r}")
            return
        r = step.result
        if r is None:
            logger.info("[finetune] job %d: micro-step %d abandoned while paused (%s)",
                        job.job_id, recipe.state.micro_step + 1,
                        self._stop_reason or self._stop_job)
            recipe.discard_partial_accumulation()
            self._accumulation_dropped = True
            return
        idle_after_s = self.quota.idle_after(level, r.duration_s)
        self._idle_until = time.monotonic() + idle_after_s
        yield self._report(recipe, job, level, r, idle_after_s)
        self._paused_s = 0.0
        if r.logged is not None:
            g = r.logged
            yield StepLogged(job_id=job.job_id, step=g.step, epoch=g.epoch, loss=g.loss,
                             learning_rate=g.learning_rate, grad_norm=g.grad_norm,
                             tokens=g.tokens, tokens_per_s=g.tokens_per_s, level=level)
        if recipe.checkpoint_due(r):
            yield from self._checkpoint(recipe, job)
        if recipe.done:
            yield self._finish()

    def _checkpoint(self, recipe: LoRARecipe, job: StartJob) -> Iterator[FinetuneToDaemon]:
        """Score the adapter on the validation file (if the job has one), then write the
        checkpoint, whose trainer_state.json holds the score (HF's Trainer evaluates before it
        saves, too). The checkpoint of the last step is the final adapter's score."""
        score: ValidationScore | None = None
        error: str | None = None
        if recipe.validates:
            score, error = yield from self._validate(recipe, job)
        path = recipe.save_checkpoint()
        yield CheckpointSaved(job_id=job.job_id, step=recipe.state.step, path=str(path),
                              epoch=recipe.epoch_progress, validation=score,
                              validation_error=error)

    def _validate(self, recipe: LoRARecipe, job: StartJob) -> Generator[
            FinetuneToDaemon, None, tuple[ValidationScore | None, str | None]]:
        """``recipe.validate`` at the level in force, obeying the daemon between two batches
        as between two chunks of a micro-step. Returns the score, or None and why not: a stop
        while paused gives it up (the checkpoint is still written), and so does an error in
        it, which fails no job: the training it would score is intact."""
        t0 = time.monotonic()
        owed_idle_s = max(0.0, self._idle_until - t0)  # the micro-step's, not yet idled
        busy_s = 0.0
        run = recipe.validate(self._chunk_tokens())
        try:
            while True:
                t1 = time.monotonic()
                try:
                    next(run)
                except StopIteration as done:
                    busy_s += time.monotonic() - t1
                    score: ValidationScore = done.value
                    return score, None
                except Exception as e:
                    busy_s += time.monotonic() - t1
                    logger.exception("[finetune] job %d: validation at step %d failed",
                                     job.job_id, recipe.state.step)
                    return None, f"validation failed: {e!r}"
                busy_s += time.monotonic() - t1
                waited_s = yield from self._at_chunk_boundary()
                if waited_s is None:
                    run.close()
                    return None, "given up: stopped while paused"
                self._paused_s += waited_s  # reported with the next micro-step
        finally:
            # The duty cycle of a CPU level holds over the scoring as over a micro-step: the
            # idle it owes comes after it, with what the micro-step before still owed.
            self._idle_until = time.monotonic() + owed_idle_s + self.quota.idle_after(
                max(1, self.decision.level), busy_s)

    def _report(self, recipe: LoRARecipe, job: StartJob, level: int, r: MicroStepResult,
                idle_after_s: float) -> MicroStepReport:
        return MicroStepReport(
            job_id=job.job_id, micro_step=r.micro_step, step=r.step, epoch=r.epoch,
            tokens=r.tokens, step_tokens=r.step_tokens, duration_s=r.duration_s, level=level,
            loss=r.loss, paused_s=self._paused_s + r.waited_s,
            total_steps=recipe.total_steps,
            lease_bytes=r.lease.lease_bytes if r.lease else 0,
            lease_saved_bytes=r.lease.lease_saved_bytes if r.lease else 0,
            private_saved_bytes=r.lease.private_saved_bytes if r.lease else 0,
            fallback_tensors=r.lease.fallback_tensors if r.lease else 0, chunks=r.chunks,
            idle_after_s=idle_after_s, fence_follows=self._fence_follows)

    # -- inside a micro-step -------------------------------------------------------------------

    def _at_chunk_boundary(self) -> Generator[FinetuneToDaemon, None, float | None]:
        """Between two chunks of a micro-step, where the lease is empty and the finished
        chunks' gradients are accumulated: handle the queued messages (a lease grant or
        reclaim is applied here and a reclaim answered at once) and, while the daemon has the
        finetune paused, wait here. Returns the seconds waited (0.0 when it did not wait,
        which the micro-step's duration then keeps), or None to abandon the micro-step: a
        stop or cancel while paused. One that comes while running lets the micro-step
        finish, as at a micro-step boundary."""
        t0 = time.monotonic()
        timeout_ms = 0
        while True:
            self.inbox.drain(timeout_ms)
            yield from self._handle_queued()
            paused = not self._admitted()
            stopping = self._stop_reason or self._stop_job
            if stopping and (paused or timeout_ms):
                return None
            if not paused or stopping:
                # A level read here takes effect for the next chunk (one read inside the
                # chunk, and a drop's fence, took effect between blocks: _between_blocks).
                self._apply_decision()
                return time.monotonic() - t0 if timeout_ms else 0.0
            timeout_ms = _IDLE_WAIT_MS  # paused: wait for the next message

    def _between_blocks(self) -> None:
        """Called by the training thread between its model's blocks (``block_hooks``), inside
        a chunk: follow a fence the daemon has put on our threads since (a drop), and apply a
        decision that came since (a rise: decode went idle) now rather than at the chunk's
        end. A pause and every other message wait in the inbox for the chunk boundary (the
        lease must be empty to grant or reclaim pages)."""
        if self.quota.follow_fence():
            self._fence_follows += 1
        decision = self.inbox.poll_latest_decision()
        if decision.admitted and decision.level > 0:
            self._apply_decision()  # a seq comparison when nothing new came

    def _apply_decision(self) -> None:
        """The quota of the latest decision, once per decision. Only a new decision re-applies
        it: the daemon may have fenced our threads off decode's cores for a newer one we have
        not read yet, and re-widening them for the old level would undo that."""
        if self.decision.seq != self._applied_seq and self.decision.level > 0:
            self.quota.apply(self.decision.level)
            self._applied_seq = self.decision.seq

    def _chunk_tokens(self) -> int:
        """The next chunk's padded tokens at the level in force: a rise mid-micro-step gets
        the top level's chunks, measured ~10-25 % faster for two threads than the level
        below's (``CpuQuota.chunk_scale``)."""
        return self.cfg.finetune.chunk_tokens * self.quota.chunk_scale(
            max(1, self.decision.level))

    def report_fatal(self, exc: BaseException) -> None:
        self._emit(FinetuneFatal(incarnation=self.incarnation, error=repr(exc),
                                 traceback=traceback.format_exc()))

    def close(self) -> None:
        self._out.close(linger=None)
        self.inbox.close()
        self._ctx.term()
