"""``harli bench-http``'s bookkeeping: ratios paired within rounds, and attainment of the
client's inter-token latencies."""

from __future__ import annotations

import pytest

from harli.bench.http_serving import METRICS, _summary, _within, ratios


def _run(rnd: int, server: str, scale: float) -> dict[str, float | int | str]:
    return {"round": rnd, "server": server, **{m: scale * (i + 1) for i, m in enumerate(METRICS)}}


def test_ratios_are_paired_within_each_round() -> None:
    runs = [_run(0, "harli", 1.0), _run(0, "vllm", 2.0), _run(1, "harli", 3.0),
            _run(1, "vllm", 2.0), _run(2, "harli", 1.0)]  # round 2 lacks vllm: left out
    q = ratios(runs)
    assert set(q) == set(METRICS)
    assert q["request_throughput"] == {"median": pytest.approx(1.0), "lo": 0.5, "hi": 1.5,
                                       "n": 2}


def test_client_itls_in_ms_and_their_share_within_the_slo() -> None:
    s = _summary({**{m: 1.0 for m in METRICS}, "completed": 3,
                  "itls": [[0.005, 0.007], [0.020]]})
    assert s["itls_ms"] == pytest.approx([5.0, 7.0, 20.0])
    assert s["p99_itl_ms"] == pytest.approx(20.0)
    assert _within(s["itls_ms"], 10.0) == pytest.approx(2 / 3)
    assert _within([], 10.0) is None
