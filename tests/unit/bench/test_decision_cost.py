"""``python -m harli.bench.decision_cost`` measures what it says: decisions of the full path
(an online correction at every level, no drift), an infeasible stream that is infeasible, and
every figure reported (their values are the benchmark's, not asserted)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from harli.bench import decision_cost as dc
from harli.scheduler.policy import REASON_INFEASIBLE, HarliPolicy


def test_the_synthetic_model_has_a_settled_correction_at_every_level() -> None:
    stats = dc.synthetic_model().stats()
    assert stats["samples_seen"] == {lv: 200 for lv in range(dc.LEVELS + 1)}
    assert stats["drift_events"] == {lv: 0 for lv in range(dc.LEVELS + 1)}
    assert stats["fallback_predictions"] == {}


def test_the_streams_hold_the_decisions_they_are_named_for() -> None:
    model = dc.synthetic_model()
    streams = dc.streams(500)
    kinds = {}
    for name, stream in streams.items():
        policy = HarliPolicy(model, dc.LEVELS, dc.SLO)
        kinds[name] = Counter(policy.decide(v, float(t)).kind for t, v in enumerate(stream))
    assert set(kinds["infeasible"]) == {REASON_INFEASIBLE}
    assert kinds["mixed"]["idle"] > 0 and kinds["mixed"][REASON_INFEASIBLE] > 0
    assert sum(kinds["mixed"].values()) - kinds["mixed"]["idle"] \
        - kinds["mixed"][REASON_INFEASIBLE] > 0  # and feasible ones


def test_run_reports_every_figure() -> None:
    res = dc.run(n=200)
    assert res["decisions"] == 200 and res["levels"] == dc.LEVELS
    assert set(res["decide_us"]) == {"mixed", "infeasible"}
    figures = [v for d in res["decide_us"].values() for v in d.values()]
    assert all(math.isfinite(v) and v > 0 for v in [*figures, res["predict_mean_us"]])
    with pytest.raises(ValueError, match="n must be"):
        dc.run(n=5)
