"""``harli status``'s line on the predictor: which profile is in force and since when."""

from __future__ import annotations

import time

from harli.cli.status import _predictor_in_force
from harli.ipc.control import PredictorStatus


def status(**kw: object) -> PredictorStatus:
    base: dict[str, object] = dict(mode="online", profile=None, samples_seen={}, bias={},
                                   drift_events=0, fallback_predictions=0,
                                   recent_mean_abs_pct_error=None)
    base.update(kw)
    return PredictorStatus(**base)  # type: ignore[arg-type]


def test_the_predictor_in_force_and_since_when() -> None:
    now = time.time()
    assert "conservative prior" in _predictor_in_force(status())
    text = _predictor_in_force(status(since=now - 30, last_fit=now - 5, online_refits=3,
                                      levels_learnt={2: now - 20, 1: now - 25}))
    assert text.startswith("no profile: learnt online, stage 1 since ")
    assert "(30 s ago)" in text and "3 fits, last refit" in text and "(5 s ago)" in text
    assert text.index("L1 since") < text.index("L2 since")
    assert "none yet" in _predictor_in_force(status(since=now - 600, online_refits=1))
    assert "(10 min ago)" in _predictor_in_force(status(since=now - 600, online_refits=1))
    prof = _predictor_in_force(status(mode="profile", profile="/p.json", since=now - 7300))
    assert prof.startswith("profile /p.json, in force since ") and "(2.0 h ago)" in prof
