"""``MemoryManager``: the daemon's side of the unified memory pool.

It keeps the ``PageLedger`` of the arena and moves pages between decode and the finetune:

* **lend** - when decode has more free KV blocks than the lending policy's mark, ask decode_proc
  (``LendBlocks``) to withdraw whole groups of free blocks from vLLM's free queue; its answer
  (``BlocksLent``) names the groups, whose pages go decode -> free -> finetune in the ledger and
  to the finetune in a ``GrantLease``.
* **reclaim** - when the free blocks fall under the mark (or the job ends, or decode died), ask
  the finetune (``ReclaimLease``) for groups back before a deadline; it answers at its next
  micro-step boundary (``LeaseReturned``); the pages go finetune -> free -> decode and the groups
  back to vLLM's queue (``ReturnBlocks``). A finetune that misses the deadline is killed: its
  pages come back when its exit is reaped, and its job resumes from its checkpoint.

Decode never waits on the finetune: it keeps the mark free at all times, and a dead decode is
restarted only once the finetune holds no page of the KV cache the new engine will zero.

No sockets here: the daemon passes messages in and gives it ``send`` callables.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from harli.config import MemoryConfig
from harli.daemon.kv_pages import KVPageMap
from harli.daemon.ledger import LedgerError, Owner, PageLedger
from harli.daemon.metrics import Metrics
from harli.ipc.control import MemoryStatus
from harli.ipc.decode import (
    BlocksLent,
    BlocksReturned,
    IterationTelemetry,
    LendBlocks,
    ReturnBlocks,
    RuntimeInfo,
)
from harli.ipc.finetune import (
    DaemonToFinetune,
    GrantLease,
    LeaseRefused,
    LeaseReturned,
    MicroStepReport,
    ReclaimLease,
)
from harli.scheduler.lending import kv_demand_blocks, plan_lending

logger = logging.getLogger(__name__)

_MICRO_STEP_ALPHA = 0.3  # EWMA weight of the newest micro-step time (reclaim deadline)


@dataclass
class PendingReclaim:
    seq: int
    pages: set[int]
    reason: str
    sent_s: float
    deadline_s: float
    killed: bool = False


class MemoryManager:
    def __init__(self, cfg: MemoryConfig, num_pages: int, page_bytes: int,
                 send_decode: Callable[[LendBlocks | ReturnBlocks], bool],
                 send_finetune: Callable[[DaemonToFinetune], bool],
                 kill_finetune: Callable[[str], None], metrics: Metrics) -> None:
        self.cfg = cfg
        self.page_bytes = page_bytes
        self.ledger = PageLedger(num_pages)
        self.map: KVPageMap | None = None
        self._send_decode = send_decode
        self._send_finetune = send_finetune
        self._kill_finetune = kill_finetune
        self.metrics = metrics
        self.decode_incarnation: int | None = None
        self.block_size = 1
        self.finetune_training = False  # a job is running in the finetune process
        self.free_blocks = 0
        self._demand_inputs = (0, 0, 0)  # running, waiting, waiting prompt tokens
        self._seq = 0
        self._decode_seq = 0  # last op sent to decode; telemetry counts only once it applied
        self._lend_in_flight: int | None = None
        self.finetune_groups: set[int] = set()  # groups whose pages the finetune holds
        self.reclaim: PendingReclaim | None = None
        self.micro_step_s: float | None = None
        self.reclaim_latencies_s: list[float] = []
        self.outcomes: dict[str, int] = {}
        self.kv_blocks_total = 0
        self.preemptions = 0
        self.scrubs = 0
        self.scrub_max_s: float | None = None
        # Free pages holding bytes the finetune wrote and did not zero (it died holding them,
        # or said nothing): decode zeroes their groups when they go back (ReturnBlocks.scrub).
        self._dirty_pages: set[int] = set()
        self.saved_lease_bytes = 0
        self.saved_private_bytes = 0
        self.fallback_tensors = 0
        for owner in Owner:  # read at scrape time
            metrics.arena_pages.labels(owner.value).set_function(self._counter(owner))
        metrics.finetune_lent_bytes.set_function(
            lambda: float(self.ledger.count(Owner.FINETUNE) * page_bytes))

    def _counter(self, owner: Owner) -> Callable[[], float]:
        return lambda: float(self.ledger.count(owner))

    # -- state -------------------------------------------------------------------------------

    @property
    def lending(self) -> bool:
        return self.map is not None and self.cfg.lend

    def may_start_decode(self) -> bool:
        """A new decode engine zeroes the whole KV cache: never while the finetune holds any
        of it."""
        return self.ledger.count(Owner.FINETUNE) == 0

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _pages(self, groups: list[int] | set[int]) -> list[int]:
        assert self.map is not None
        return [p for g in sorted(groups) for p in self.map.pages_of(g)]

    # -- decode_proc -------------------------------------------------------------------------

    def on_decode_ready(self, incarnation: int, info: RuntimeInfo, now: float) -> None:
        self.decode_incarnation = incarnation
        self.block_size = info.block_size
        self.kv_blocks_total = info.kv_blocks_total
        self.free_blocks = info.kv_blocks_total - 1  # vLLM's null block is never free
        self._lend_in_flight = None
        self._dirty_pages.clear()  # a new engine zeroes its whole KV cache (kv_arena)
        if info.kv_layout is None:
            self.map = None
            return
        try:
            self.map = KVPageMap(info.kv_layout, self.page_bytes, self.ledger.num_pages)
        except ValueError as e:
            logger.error("[memory] KV lending off: %s", e)
            self.map = None
            return
        pages = [p for p in self.map.kv_pages if self.ledger.owner(p) is Owner.FREE]
        if pages:
            self.ledger.take_for_decode(pages, f"vLLM KV cache of decode[{incarnation}]", now)
        logger.info("[memory] decode[%d]: %d KV pages in the arena, %d groups of %d blocks "
                    "(%d pages each) lendable", incarnation, len(self.map.kv_pages),
                    self.map.num_groups, self.map.blocks_per_group,
                    len(self.map.pages_of(0)) if self.map.num_groups else 0)

    def on_decode_exit(self, now: float) -> None:
        self.decode_incarnation = None
        self._lend_in_flight = None
        held = self.ledger.pages_of(Owner.DECODE)
        if held:
            self.ledger.free_from_decode(held, "decode process exited", now)
        if self.finetune_groups:
            # The next engine zeroes the KV cache: it starts only when these are back.
            self._start_reclaim(set(self.finetune_groups), "decode restarting", now)

    def on_telemetry(self, t: IterationTelemetry) -> None:
        self.preemptions += t.preempted
        if t.incarnation != self.decode_incarnation:
            return
        self._demand_inputs = (t.num_running, t.num_waiting, t.waiting_tokens)
        if t.lend_seq == self._decode_seq:  # it reflects every lend/return we sent
            self.free_blocks = t.kv_blocks_free

    def on_blocks_lent(self, msg: BlocksLent, now: float) -> None:
        if msg.incarnation != self.decode_incarnation or msg.seq != self._lend_in_flight:
            logger.error("[memory] stale BlocksLent %d from decode[%d]; ignored", msg.seq,
                         msg.incarnation)
            return
        self._lend_in_flight = None
        self.free_blocks = msg.kv_blocks_free
        if not msg.groups or self.map is None:
            return
        try:
            pages = self._pages(msg.groups)
            self.ledger.free_from_decode(pages, f"decode lent KV block groups {_span(msg.groups)}",
                                         now)
        except (LedgerError, ValueError) as e:
            self.metrics.lease_errors.labels("decode").inc()
            logger.error("[memory] decode lent groups the ledger refuses: %s", e)
            return
        if not (self.finetune_training and self._send_finetune(
                GrantLease(seq=self._next_seq(), pages=pages))):
            self._return_to_decode(set(msg.groups), "nobody to lend to", now)
            return
        self.ledger.lend(pages, f"lease for activations: groups {_span(msg.groups)}", now)
        self.finetune_groups.update(msg.groups)

    def on_blocks_returned(self, msg: BlocksReturned) -> None:
        if msg.incarnation != self.decode_incarnation:
            return
        if msg.scrub_s > 0:
            self.metrics.kv_scrub_s.observe(msg.scrub_s)
            self.scrubs += 1
            self.scrub_max_s = max(self.scrub_max_s or 0.0, msg.scrub_s)
        if msg.error is not None:
            self.metrics.lease_errors.labels("decode").inc()
            logger.error("[memory] decode refused ReturnBlocks %d: %s", msg.seq, msg.error)
        if msg.seq == self._decode_seq:
            self.free_blocks = msg.kv_blocks_free

    def _return_to_decode(self, groups: set[int], reason: str, now: float) -> None:
        if not groups:
            return
        if self.decode_incarnation is None:
            return  # they stay free; the next engine takes them with the whole KV cache
        seq = self._next_seq()
        pages = self._pages(groups)
        scrub = not self._dirty_pages.isdisjoint(pages)
        if not self._send_decode(ReturnBlocks(seq=seq, groups=sorted(groups), scrub=scrub)):
            logger.error("[memory] decode not connected; groups %s stay free", _span(groups))
            return
        self._dirty_pages.difference_update(pages)
        self._decode_seq = seq
        self.ledger.take_for_decode(pages, f"back to vLLM: {reason}", now)
        self.free_blocks += len(groups) * (self.map.blocks_per_group if self.map else 0)

    # -- finetune_proc -----------------------------------------------------------------------

    def set_finetune_training(self, training: bool, now: float) -> None:
        self.finetune_training = training
        if not training and self.finetune_groups and self.reclaim is None:
            self._start_reclaim(set(self.finetune_groups), "no job is training", now)

    def on_micro_step(self, r: MicroStepReport) -> None:
        self.saved_lease_bytes += r.lease_saved_bytes
        self.saved_private_bytes += r.private_saved_bytes
        self.fallback_tensors += r.fallback_tensors
        duration_s = r.duration_s
        prev = self.micro_step_s
        self.micro_step_s = duration_s if prev is None else (
            _MICRO_STEP_ALPHA * duration_s + (1 - _MICRO_STEP_ALPHA) * prev)

    def on_lease_returned(self, msg: LeaseReturned, now: float) -> None:
        try:
            self.ledger.give_back(msg.pages, f"finetune returned them: {msg.reason}", now)
        except LedgerError as e:
            self.metrics.lease_errors.labels("finetune").inc()
            logger.error("[memory] finetune returned pages it does not hold: %s", e)
            self._send_finetune(LeaseRefused(seq=msg.seq, message=str(e)))
            return
        if not msg.clean:
            self._dirty_pages.update(msg.pages)
        r = self.reclaim
        if r is not None:
            r.pages.difference_update(msg.pages)
            if not r.pages:
                self._reclaim_done("returned", now)
        self._collect_free_groups(msg.reason, now)

    def on_finetune_exit(self, now: float) -> None:
        self.finetune_training = False
        change = self.ledger.finetune_crashed("finetune process exited", now)
        if change is not None:  # whatever it held may hold what it wrote
            self._dirty_pages.update(change.pages)
        if self.reclaim is not None:
            self._reclaim_done("killed" if self.reclaim.killed else "finetune_died", now)
        self._collect_free_groups("finetune process exited", now)

    def _collect_free_groups(self, reason: str, now: float) -> None:
        """Groups all of whose pages the finetune has let go of go back to decode."""
        done = {g for g in self.finetune_groups
                if all(self.ledger.owner(p) is Owner.FREE for p in self._pages([g]))}
        self.finetune_groups -= done
        self._return_to_decode(done, reason, now)

    def _start_reclaim(self, groups: set[int], reason: str, now: float) -> None:
        pages = [p for p in self._pages(groups) if self.ledger.owner(p) is Owner.FINETUNE]
        if not pages:
            return
        factor, floor = self.cfg.reclaim_deadline_factor, self.cfg.reclaim_deadline_min_s
        deadline = max(floor, factor * (self.micro_step_s or 0.0))
        seq = self._next_seq()
        self.reclaim = PendingReclaim(seq=seq, pages=set(pages), reason=reason, sent_s=now,
                                      deadline_s=now + deadline)
        self._send_finetune(ReclaimLease(seq=seq, pages=pages, deadline_s=now + deadline))
        logger.info("[memory] reclaiming %d pages (%d groups) within %.2f s: %s", len(pages),
                    len(groups), deadline, reason)

    def _reclaim_done(self, outcome: str, now: float) -> None:
        r = self.reclaim
        assert r is not None
        self.reclaim = None
        latency = now - r.sent_s
        self.reclaim_latencies_s.append(latency)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.metrics.reclaims.labels(outcome).inc()
        self.metrics.reclaim_s.observe(latency)
        log = logger.info if outcome == "returned" else logger.error
        log("[memory] reclaim %d (%s) done in %.3f s: %s", r.seq, r.reason, latency, outcome)

    # -- the loop ----------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        r = self.reclaim
        if r is not None:
            if now > r.deadline_s and not r.killed:
                r.killed = True
                self.metrics.reclaims.labels("deadline_missed").inc()
                self._kill_finetune(f"missed the reclaim deadline by {now - r.deadline_s:.2f} s "
                                    f"({len(r.pages)} pages outstanding); the job resumes from "
                                    f"its checkpoint")
            return
        if not self.lending or self.decode_incarnation is None:
            return
        assert self.map is not None
        if not self.finetune_training:
            if self.finetune_groups:
                self._start_reclaim(set(self.finetune_groups), "no job is training", now)
            return
        bpg = self.map.blocks_per_group
        running, waiting, waiting_tokens = self._demand_inputs
        demand = kv_demand_blocks(running, waiting, waiting_tokens, self.cfg.horizon_iters,
                                  self.block_size)
        plan = plan_lending(self.free_blocks, len(self.finetune_groups) * bpg,
                            self.cfg.floor_blocks, demand)
        if plan.reclaim > 0:
            n = math.ceil(plan.reclaim / bpg)
            # The most recently lent (lowest ids: lent last) first; any order is correct.
            groups = set(sorted(self.finetune_groups)[:n])
            self._start_reclaim(groups, f"{self.free_blocks} free KV blocks < mark {plan.mark}",
                                now)
        elif plan.lend >= 2 * bpg and self._lend_in_flight is None:
            # Only whole groups, and a group of slack so that lend and reclaim do not flap
            # on a one-block change of the demand.
            seq = self._next_seq()
            if self._send_decode(LendBlocks(seq=seq, max_groups=plan.lend // bpg - 1,
                                            blocks_per_group=bpg)):
                self._lend_in_flight = seq
                self._decode_seq = seq

    def status(self) -> MemoryStatus:
        m = self.map
        lat = sorted(self.reclaim_latencies_s)
        return MemoryStatus(
            page_bytes=self.page_bytes, pages=self.ledger.counts(), lending=self.lending,
            blocks_per_group=m.blocks_per_group if m else 0, kv_groups=m.num_groups if m else 0,
            groups_lent=len(self.finetune_groups), kv_blocks_total=self.kv_blocks_total,
            kv_blocks_free=self.free_blocks, reclaim_pending=self.reclaim is not None,
            reclaims=dict(self.outcomes), reclaim_p50_s=lat[len(lat) // 2] if lat else None,
            reclaim_max_s=lat[-1] if lat else None, saved_lease_bytes=self.saved_lease_bytes,
            saved_private_bytes=self.saved_private_bytes,
            fallback_tensors=self.fallback_tensors, preemptions=self.preemptions,
            scrubs=self.scrubs, scrub_max_s=self.scrub_max_s)


def _span(groups: list[int] | set[int]) -> str:
    g = sorted(groups)
    return f"{g[0]}..{g[-1]} ({len(g)})" if len(g) > 1 else str(g[0]) if g else "none"
