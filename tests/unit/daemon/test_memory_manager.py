"""The daemon's ``MemoryManager``: lending, reclaim with a deadline, crashes of either child,
and lease messages the ledger refuses - driven by messages, with ``now`` passed in."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harli.config import MemoryConfig
from harli.daemon.ledger import Owner
from harli.daemon.memory import MemoryManager
from harli.daemon.metrics import Metrics
from harli.ipc.decode import (
    BlocksLent,
    IterationTelemetry,
    KVLayout,
    LendBlocks,
    ReturnBlocks,
    RuntimeInfo,
)
from harli.ipc.finetune import (
    GrantLease,
    LeaseRefused,
    LeaseReturned,
    MicroStepReport,
    ReclaimLease,
)

from .invariants import assert_ledger_balanced

MIB = 1 << 20
LAYERS, BLOCKS = 4, 64  # 4 layers x 64 blocks of 256 KiB: 8 groups of 8 blocks, 4 pages each


def info() -> RuntimeInfo:
    return RuntimeInfo(model="m", max_model_len=2048, kv_blocks_total=BLOCKS, block_size=128,
                       vllm_version="x", device="cpu",
                       kv_layout=KVLayout(layer_offsets_bytes=[i * 16 * MIB for i in range(4)],
                                          block_bytes=256 << 10, num_blocks=BLOCKS))


class Harness:
    def __init__(self, **cfg: Any) -> None:
        self.to_decode: list[Any] = []
        self.to_finetune: list[Any] = []
        self.killed: list[str] = []
        self.mm = MemoryManager(MemoryConfig(floor_blocks=8, **cfg), num_pages=40,
                                page_bytes=2 * MIB, send_decode=self._dec,
                                send_finetune=self._ft, kill_finetune=self.killed.append,
                                metrics=Metrics())
        self.free = BLOCKS - 1
        self.lent: set[int] = set()

    def _dec(self, m: Any) -> bool:
        self.to_decode.append(m)
        return True

    def _ft(self, m: Any) -> bool:
        self.to_finetune.append(m)
        return True

    def start(self, now: float = 0.0) -> None:
        self.mm.on_decode_ready(1, info(), now)
        self.mm.set_finetune_training(True, now)

    def decode_answers(self, now: float) -> None:
        """decode_proc's side: lend the highest wholly free groups, take groups back."""
        for m in self.to_decode:
            if isinstance(m, LendBlocks):
                free_groups = [g for g in range(BLOCKS // 8 - 1, 0, -1) if g not in self.lent]
                got = free_groups[:min(m.max_groups, self.free // 8)]
                self.lent.update(got)
                self.free -= 8 * len(got)
                self.mm.on_blocks_lent(BlocksLent(incarnation=1, seq=m.seq, groups=got,
                                                  kv_blocks_free=self.free), now)
            elif isinstance(m, ReturnBlocks):
                self.lent.difference_update(m.groups)
                self.free += 8 * len(m.groups)
        self.to_decode.clear()

    def telemetry(self, running: int = 0, waiting: int = 0, waiting_tokens: int = 0,
                  used: int = 0) -> None:
        self.mm.on_telemetry(IterationTelemetry(
            incarnation=1, iteration=1, start_s=0, end_s=0, num_running=running,
            num_waiting=waiting, decode_tokens=0, prefill_tokens=0, context_tokens=0,
            kv_blocks_total=BLOCKS, kv_blocks_free=self.free - used, waiting_tokens=waiting_tokens,
            lend_seq=self.mm._decode_seq))

    def leased(self) -> set[int]:
        return set(self.mm.ledger.pages_of(Owner.FINETUNE))


def test_idle_decode_lends_most_free_blocks_and_the_ledger_follows() -> None:
    h = Harness()
    h.start()
    assert h.mm.ledger.counts() == {"free": 8, "decode": 32, "finetune": 0}  # 32 KV pages
    h.telemetry()
    h.mm.tick(0.1)
    [lend] = h.to_decode
    assert isinstance(lend, LendBlocks) and lend.blocks_per_group == 8
    h.decode_answers(0.1)
    [grant] = h.to_finetune
    assert isinstance(grant, GrantLease)
    assert set(grant.pages) == h.leased() and len(grant.pages) == 4 * len(h.lent)
    # At least half of the free KV pages are lent, and the floor stays free for decode.
    assert len(h.lent) * 8 >= (BLOCKS - 1) / 2 and h.free >= 8
    assert_ledger_balanced(h.mm.ledger)
    assert h.mm.status().groups_lent == len(h.lent)


def lend_all(h: Harness, now: float = 0.1) -> None:
    h.start()
    h.telemetry()
    h.mm.tick(now)
    h.decode_answers(now)
    h.to_finetune.clear()


def test_demand_over_the_free_mark_reclaims_with_a_deadline_and_returns_blocks() -> None:
    h = Harness()
    lend_all(h)
    h.mm.on_micro_step(MicroStepReport(job_id=1, micro_step=1, step=0, epoch=0, tokens=1,
                                       step_tokens=1, duration_s=0.8, level=2, loss=1.0,
                                       paused_s=0, total_steps=9))
    h.telemetry(running=8, waiting=4, waiting_tokens=1000)  # demand 16 + 8 + 4 = 28 > free
    h.mm.tick(5.0)
    [rec] = h.to_finetune
    assert isinstance(rec, ReclaimLease)
    assert rec.deadline_s == pytest.approx(5.0 + 1.6)  # 2 x the micro-step time
    assert set(rec.pages) <= h.leased()
    h.mm.tick(5.1)
    assert not h.killed and len(h.to_finetune) == 1  # one reclaim at a time
    h.mm.on_lease_returned(LeaseReturned(seq=rec.seq, pages=rec.pages, reason="reclaimed"), 5.3)
    [ret] = h.to_decode
    assert isinstance(ret, ReturnBlocks)
    assert {p for g in ret.groups for p in h.mm.map.pages_of(g)} == set(rec.pages)  # type: ignore[union-attr]
    assert ret.scrub  # the finetune did not say it zeroed them: decode does
    assert not set(rec.pages) & h.leased()
    assert h.mm.status().reclaims == {"returned": 1}
    assert h.mm.status().reclaim_max_s == pytest.approx(0.3)
    assert_ledger_balanced(h.mm.ledger)


def test_decode_zeroes_returned_blocks_unless_the_finetune_cleared_every_page() -> None:
    h = Harness()
    lend_all(h)
    h.mm.set_finetune_training(False, 2.0)  # job ended: everything is asked back
    [rec] = h.to_finetune
    h.mm.on_lease_returned(LeaseReturned(seq=rec.seq, pages=rec.pages, reason="reclaimed",
                                         clean=True), 2.1)
    assert h.to_decode and not any(m.scrub for m in h.to_decode)  # cleared by the finetune
    # A finetune that dies holding pages leaves its bytes there: decode zeroes those groups.
    h2 = Harness()
    lend_all(h2)
    h2.mm.on_finetune_exit(3.0)
    assert h2.to_decode and all(m.scrub for m in h2.to_decode)


def test_pages_not_held_are_refused_and_the_ledger_is_unchanged() -> None:
    h = Harness()
    lend_all(h)
    before = h.mm.ledger.counts(), h.leased()
    not_held = sorted(set(range(40)) - h.leased())[:3]
    h.mm.on_lease_returned(LeaseReturned(seq=0, pages=not_held, reason="bogus"), 1.0)
    [refusal] = h.to_finetune
    assert isinstance(refusal, LeaseRefused) and "must be finetune" in refusal.message
    assert (h.mm.ledger.counts(), h.leased()) == before and not h.to_decode
    h.mm.on_lease_returned(LeaseReturned(seq=0, pages=[999], reason="bogus"), 1.0)
    assert "outside" in h.to_finetune[-1].message
    assert (h.mm.ledger.counts(), h.leased()) == before


def test_missed_deadline_kills_the_finetune_and_its_exit_returns_the_pages() -> None:
    h = Harness()
    lend_all(h)
    h.mm.set_finetune_training(False, 2.0)  # job ended: everything is asked back
    [rec] = h.to_finetune
    assert set(rec.pages) == h.leased()
    h.mm.tick(rec.deadline_s + 0.01)
    assert len(h.killed) == 1 and "deadline" in h.killed[0]
    h.mm.tick(rec.deadline_s + 0.5)
    assert len(h.killed) == 1  # killed once
    assert h.mm.may_start_decode() is False
    h.mm.on_finetune_exit(rec.deadline_s + 0.6)
    assert not h.leased() and h.mm.ledger.count(Owner.DECODE) == 32
    [ret] = h.to_decode
    assert sorted(ret.groups) == sorted(h.lent)
    assert h.mm.status().reclaims == {"killed": 1}


def test_kill_9_of_the_finetune_returns_every_page_at_once() -> None:
    h = Harness()
    lend_all(h)
    assert h.leased()
    h.mm.on_finetune_exit(3.0)
    assert not h.leased() and h.mm.ledger.count(Owner.DECODE) == 32
    h.decode_answers(3.0)
    assert not h.lent and h.free == BLOCKS - 1


def test_decode_restarts_only_once_the_finetune_gave_the_kv_cache_back() -> None:
    h = Harness()
    lend_all(h)
    h.mm.on_decode_exit(4.0)
    assert not h.mm.may_start_decode()
    [rec] = h.to_finetune
    assert isinstance(rec, ReclaimLease) and set(rec.pages) == h.leased()
    h.mm.on_lease_returned(LeaseReturned(seq=rec.seq, pages=rec.pages, reason="reclaimed"), 4.1)
    assert h.mm.may_start_decode() and not h.to_decode  # nothing sent to a dead decode
    assert h.mm.ledger.counts() == {"free": 40, "decode": 0, "finetune": 0}
    h.mm.on_decode_ready(2, info(), 5.0)
    assert h.mm.ledger.counts() == {"free": 8, "decode": 32, "finetune": 0}


def test_no_lending_without_a_training_job_or_with_lending_off() -> None:
    h = Harness()
    h.mm.on_decode_ready(1, info(), 0.0)
    h.telemetry()
    h.mm.tick(0.1)
    assert not h.to_decode
    off = Harness(lend=False)
    off.start()
    off.telemetry()
    off.mm.tick(0.1)
    assert not off.to_decode and not off.mm.status().lending


@settings(deadline=None, max_examples=60)
@given(st.lists(st.tuples(st.sampled_from(["tick", "busy", "idle", "return", "crash",
                                           "job_end", "job_start", "late"]),
                          st.integers(0, 40)), max_size=40))
def test_any_event_sequence_keeps_the_books(events: list[tuple[str, int]]) -> None:
    h = Harness()
    h.start()
    now = 0.0
    for kind, n in events:
        now += 0.1
        if kind == "busy":
            h.telemetry(running=n, waiting=n // 4, waiting_tokens=n * 50)
        elif kind == "idle":
            h.telemetry()
        elif kind == "return":
            for m in [m for m in h.to_finetune if isinstance(m, ReclaimLease)]:
                held = [p for p in m.pages if p in h.leased()]
                if held:
                    h.mm.on_lease_returned(LeaseReturned(seq=m.seq, pages=held, reason="r"), now)
            h.to_finetune.clear()
        elif kind == "crash":
            h.mm.on_finetune_exit(now)
            h.mm.set_finetune_training(True, now)
        elif kind == "job_end":
            h.mm.set_finetune_training(False, now)
        elif kind == "job_start":
            h.mm.set_finetune_training(True, now)
        elif kind == "late":
            now += 5.0
        h.mm.tick(now)
        if h.killed:
            h.killed.clear()
            h.mm.on_finetune_exit(now)
        h.decode_answers(now)
        led = h.mm.ledger
        assert_ledger_balanced(led)
        # decode's lent groups are exactly the ones whose pages the finetune holds.
        assert {p for g in h.lent for p in h.mm.map.pages_of(g)} == h.leased()  # type: ignore[union-attr]
        assert h.free >= 0


def test_ledger_and_lease_figures_are_in_the_metrics() -> None:
    from prometheus_client import generate_latest

    h = Harness()
    lend_all(h)
    h.mm.on_micro_step(MicroStepReport(job_id=1, micro_step=1, step=0, epoch=0, tokens=1,
                                       step_tokens=1, duration_s=0.1, level=2, loss=1.0,
                                       paused_s=0, total_steps=9, lease_saved_bytes=900,
                                       private_saved_bytes=100, fallback_tensors=2))
    h.mm.metrics.on_micro_step(MicroStepReport(
        job_id=1, micro_step=1, step=0, epoch=0, tokens=1, step_tokens=1, duration_s=0.1,
        level=2, loss=1.0, paused_s=0, total_steps=9, lease_saved_bytes=900,
        private_saved_bytes=100, fallback_tensors=2))
    text = generate_latest(h.mm.metrics.registry).decode()
    leased = len(h.leased())
    assert f'harli_arena_pages{{owner="finetune"}} {float(leased)}' in text
    assert f'harli_arena_pages{{owner="decode"}} {float(32 - leased)}' in text
    assert h.mm.metrics.registry.get_sample_value("harli_finetune_lent_bytes") == \
        leased * 2 * MIB
    assert 'harli_lease_saved_bytes_total{placement="lease"} 900.0' in text
    assert "harli_lease_saved_share 0.9" in text
    st = h.mm.status()
    assert (st.saved_lease_bytes, st.saved_private_bytes, st.fallback_tensors) == (900, 100, 2)
