"""The ``QuotaController``, the one owner of the quota ``Decision``: numbering, when a decision is
sent, and the CPU fence on a level drop (with a fake child and fake CPU levels)."""

from __future__ import annotations

from typing import Any

import pytest

from harli.config import FinetuneConfig
from harli.daemon.disabled import NullChild
from harli.daemon.metrics import Metrics
from harli.daemon.quota import QuotaController
from harli.daemon.supervisor import ChildState
from harli.ipc.finetune import Decision


class FakeFinetune:
    def __init__(self, state: ChildState = ChildState.RUNNING, pid: int = 42) -> None:
        self.state = state
        self.proc: Any = type("P", (), {"pid": pid})()


class FakeFence:
    """Records each fence; moves threads unless told the cores would not change."""

    def __init__(self, moves: bool = True) -> None:
        self.moves = moves
        self.calls: list[tuple[int, int, int]] = []

    def fence(self, pid: int, from_level: int, to_level: int) -> bool:
        self.calls.append((pid, from_level, to_level))
        return self.moves


def make(finetune: Any = None, fence: Any = None,
         level: int = 2) -> tuple[QuotaController, list[Any], Metrics]:
    sent: list[Any] = []
    metrics = Metrics()
    q = QuotaController(FinetuneConfig(levels=4, level=level),
                        lambda m: sent.append(m) or True, finetune or NullChild("finetune"),
                        fence, metrics)
    return q, sent, metrics


def fences(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("harli_finetune_cpu_fences_total")


def test_the_first_decision_is_the_configured_level() -> None:
    q, sent, _ = make(level=0)
    assert q.decision == Decision(level=0, admitted=False, seq=1) and sent == []


def test_decisions_wait_for_a_ready_finetune_and_each_change_is_numbered() -> None:
    q, sent, _ = make()
    q.set_level(3)  # no finetune ready: kept, not sent
    assert sent == [] and q.decision == Decision(level=3, admitted=True, seq=2)
    q.on_finetune_ready()
    assert sent == [Decision(level=3, admitted=True, seq=2)]
    q.set_level(3)  # no change: nothing new
    q.set_level(0)
    assert sent[-1] == Decision(level=0, admitted=False, seq=3) and len(sent) == 2
    q.on_finetune_exit()
    q.set_level(1)
    assert len(sent) == 2  # the next incarnation learns it when ready
    q.on_finetune_ready()
    assert sent[-1] == Decision(level=1, admitted=True, seq=4)


def test_a_level_out_of_range_is_refused_and_changes_nothing() -> None:
    q, _, _ = make()
    with pytest.raises(ValueError, match=r"0\.\.4"):
        q.set_level(5)
    assert q.decision.seq == 1 and q.level == 2


def test_the_level_in_force_is_zero_without_a_training_job_or_when_paused() -> None:
    q, _, _ = make()
    assert (q.level_in_force(True), q.level_in_force(False)) == (2, 0)
    q.set_level(0)
    assert q.level_in_force(True) == 0


def test_a_drop_fences_a_running_finetune_at_once_and_counts_it() -> None:
    fence = FakeFence()
    q, _, metrics = make(FakeFinetune(pid=42), fence)
    q.set_level(4)  # a rise: the finetune widens itself at its next boundary
    q.set_level(1)
    assert fence.calls == [(42, 4, 1)] and fences(metrics) == 1


@pytest.mark.parametrize(("finetune", "fence"), [
    (FakeFinetune(ChildState.STARTING), FakeFence()),  # not running yet
    (NullChild("finetune"), FakeFence()),  # no finetune process
    (FakeFinetune(), None),  # no fence here (GPU host, or decode unpinned)
])
def test_no_fence_without_a_running_finetune_or_cpu_levels(finetune: Any, fence: Any) -> None:
    q, _, metrics = make(finetune, fence)
    q.set_level(0)
    assert (fence is None or fence.calls == []) and fences(metrics) == 0


def test_a_drop_that_leaves_the_cores_as_they_are_is_not_counted() -> None:
    fence = FakeFence(moves=False)
    q, _, metrics = make(FakeFinetune(), fence)
    q.set_level(1)
    assert fence.calls == [(42, 2, 1)] and fences(metrics) == 0
