"""The page ledger: any sequence of lend, reclaim, release, decode use and crash keeps the
invariants; refused changes leave it untouched; the lending plan keeps decode's mark."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from harli.daemon.ledger import LedgerError, Owner, PageLedger
from harli.scheduler.lending import plan_lending

from .invariants import assert_ledger_balanced

N = 24
pages = st.lists(st.integers(-2, N + 2), min_size=0, max_size=6)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = PageLedger(N)
        self.model = {p: Owner.FREE for p in range(N)}
        self.now = 0.0

    def _apply(self, op: str, ps: list[int], src: Owner, dst: Owner, reason: str) -> None:
        self.now += 1
        valid = (bool(ps) and bool(reason.strip()) and len(set(ps)) == len(ps)
                 and all(0 <= p < N and self.model[p] is src for p in ps))
        before = [self.ledger.owner(p) for p in range(N)], self.ledger.counts()
        if valid:
            change = getattr(self.ledger, op)(ps, reason, self.now)
            assert change.pages == tuple(ps) and change.reason == reason
            for p in ps:
                self.model[p] = dst
        else:
            with pytest.raises(LedgerError):
                getattr(self.ledger, op)(ps, reason, self.now)
            assert ([self.ledger.owner(p) for p in range(N)], self.ledger.counts()) == before

    @rule(ps=pages, reason=st.sampled_from(["kv", "", "lease"]))
    def lend(self, ps: list[int], reason: str) -> None:
        self._apply("lend", ps, Owner.FREE, Owner.FINETUNE, reason)

    @rule(ps=pages)
    def give_back(self, ps: list[int]) -> None:
        self._apply("give_back", ps, Owner.FINETUNE, Owner.FREE, "released")

    @rule(ps=pages)
    def take_for_decode(self, ps: list[int]) -> None:
        self._apply("take_for_decode", ps, Owner.FREE, Owner.DECODE, "kv")

    @rule(ps=pages)
    def free_from_decode(self, ps: list[int]) -> None:
        self._apply("free_from_decode", ps, Owner.DECODE, Owner.FREE, "done")

    @rule()
    def crash(self) -> None:
        self.now += 1
        self.ledger.finetune_crashed("finetune died", self.now)
        for p, o in self.model.items():
            if o is Owner.FINETUNE:
                self.model[p] = Owner.FREE

    @invariant()
    def matches_model_and_adds_up(self) -> None:
        assert_ledger_balanced(self.ledger)
        assert [self.ledger.owner(p) for p in range(N)] == [self.model[p] for p in range(N)]
        assert sum(self.ledger.counts().values()) == N


TestLedgerMachine = LedgerMachine.TestCase


def test_refusal_names_the_pages_and_their_owners() -> None:
    led = PageLedger(4)
    led.lend([0, 1], "lease", 0.0)
    with pytest.raises(LedgerError, match="2 is free"):
        led.give_back([1, 2], "released", 1.0)
    assert led.owner(1) is Owner.FINETUNE and led.owner(2) is Owner.FREE


@given(st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 500), st.integers(0, 500))
def test_plan_keeps_the_mark_free(free: int, leased: int, floor: int, demand: int) -> None:
    plan = plan_lending(free, leased, floor, demand)
    assert plan.mark == max(floor, demand)
    assert plan.lend == 0 or plan.reclaim == 0
    assert free - plan.lend >= min(free, plan.mark)  # never lends below the mark
    assert plan.reclaim <= leased
    if free < plan.mark:  # reclaims the whole deficit when the finetune holds enough
        assert plan.reclaim == min(leased, plan.mark - free)
