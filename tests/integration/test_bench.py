"""``harli bench`` end to end, in miniature: the same workload replayed under three policies in
alternating rounds on the real daemon, vLLM and trainer; every figure the table shows is there
and sane (no performance is asserted: that is the benchmark's job, not a test's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harli.bench.bench import plot, run_bench, verdict

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]


def test_bench_replays_one_workload_under_each_policy(tmp_path: Path) -> None:
    mask = os.sched_getaffinity(0)
    res = run_bench(tmp_path, 4.0, ["decode-only", "naive", "harli"], None, 0, 1.0, None,
                    rounds=2)
    assert os.sched_getaffinity(0) == mask  # its clients were pinned off decode's cores only
    assert res["slo_ms"] > 0 and res["slo_auto"]["median_batch"] >= 1
    for name, r in res["policies"].items():
        assert r["requests"] == 2 * res["requests"], name  # both rounds, every request
        assert r["errors"] == 0
        assert 0 <= r["attainment_token"] <= 1 and 0 <= r["attainment_request"] <= 1
        assert len(r["rounds"]) == 2 and r["decision_p99_us"] is not None
        assert all(rd["host_probe_ms"] > 0 for rd in r["rounds"])
        assert all(rd["host_steal_pct"] is None or 0 <= rd["host_steal_pct"] <= 100
                   for rd in r["rounds"])
        assert all(min(rd["reclaims"], rd["preemptions"], rd["scrubs"],
                       rd["groups_lent_max"]) >= 0 for rd in r["rounds"])
        assert r["wall_s"] >= 2 * 4.0  # each turn lasts the workload's length at least
        assert all(sum(rd["level_samples"].values()) > 0 for rd in r["rounds"])
        # The TPOT series counts from the turn's start, as the level samples do: no token
        # before the first request arrived, none after the turn ended.
        times = [t for t, _ in r["tpot_series"]]
        assert min(res["arrivals_s"]) < min(times) <= max(times) < r["rounds"][0]["wall_s"]
    assert res["policies"]["decode-only"]["finetune_tokens"] == 0  # paused: trains nothing
    assert res["policies"]["naive"]["finetune_tokens"] > 0
    assert {s["level"] for s in res["policies"]["naive"]["levels"]} == {4}
    for rd in res["policies"]["decode-only"]["rounds"]:
        assert set(rd["decisions_by_reason"]) == {"decode-only"}
        assert set(rd["decisions_by_reason"]["decode-only"]) == {"0"}
    for rd in res["policies"]["harli"]["rounds"]:  # every decision counted under a reason word
        assert set(rd["decisions_by_reason"]) <= {"idle", "steady", "down", "up", "hold",
                                                   "infeasible"}
        assert sum(sum(by.values()) for by in rd["decisions_by_reason"].values()) > 0
    png = tmp_path / "bench.png"
    plot(res, png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert verdict(res).startswith("harli kept")


def test_a_second_bench_in_the_same_dir_starts_from_a_fresh_daemon(tmp_path: Path) -> None:
    """`make run` replays its bench in the same .harli/demo/bench dir every time: the second run
    must not meet the first one's job (same name, still queued to resume)."""
    for _ in range(2):
        res = run_bench(tmp_path, 1.0, ["decode-only"], 50.0, 0, 1.0, None, rounds=1)
        assert res["policies"]["decode-only"]["errors"] == 0
