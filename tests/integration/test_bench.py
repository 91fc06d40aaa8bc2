"""``harli bench`` end to end, in miniature: policies in switchback blocks over one workload on
the real daemon, vLLM and trainer; every block counted, every figure there and sane (no
performance is asserted: that is the benchmark's job, not a test's)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from harli.bench.bench import JOB_MICRO_BATCH, JOB_SEQ_LEN, plot, run_bench, verdict

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]


def test_bench_runs_the_policies_in_blocks_over_one_workload(tmp_path: Path) -> None:
    mask = os.sched_getaffinity(0)
    pols = ["decode-only", "static:4", "harli"]
    res = run_bench(tmp_path, 9.0, pols, None, 0, 1.0, None, block_s=1.0, settle_s=0.2,
                    calib_s=3.0, resamples=200)
    assert os.sched_getaffinity(0) == mask  # its clients were pinned off decode's cores only
    assert res["slo_ms"] > 0 and res["slo_auto"]["tokens"] > 0
    assert res["errors"] == 0
    cycles = res["cycles"]
    # Two turns of the load phases at least, one phase per cycle.
    assert cycles == 6 and [sorted(c) for c in res["order"]] == [sorted(pols)] * cycles
    blocks = res["blocks"]
    assert len(blocks) == cycles * len(pols)
    # Blocks follow the schedule, in time order, each window after its settling margin.
    assert [b["policy"] for b in blocks] == [p for c in res["order"] for p in c]
    assert all(0 < b["end_s"] - b["start_s"] <= 1.0 - 0.2 + 0.1 for b in blocks)
    assert [b["phase"] for b in blocks] == \
        [ph for ph in ("quiet", "busy", "bursty") * 2 for _ in pols]
    assert all(a["end_s"] <= b["start_s"] for a, b in itertools.pairwise(blocks))
    assert all(0 <= b["tokens_ok"] <= b["tokens"] for b in blocks)
    assert sum(b["tokens"] for b in blocks) > 0
    # A micro-step admitted just before a switch to decode-only ends inside its block (a
    # micro-step is never cut); when the sampler saw no level above 0 since the previous
    # step, its tokens count there. No more than that one micro-step's may.
    one_step = JOB_MICRO_BATCH * JOB_SEQ_LEN
    assert all(b["trained_tokens"] <= one_step for b in blocks if b["policy"] == "decode-only")
    assert sum(b["trained_tokens"] for b in blocks if b["policy"] == "static:4") > 0
    v = res["verdict"]
    for p in pols:
        fig = v["policies"][p]
        assert fig["blocks"] == cycles
        if fig["attainment"]["value"] is not None:
            assert 0 <= fig["attainment"]["value"] <= 1
    assert res["decision_p99_us"]["harli"]["decision_cpu_p99_us"] is not None
    for rec in res["decisions_by_reason"]:  # every block's decisions, under a reason word
        if rec["policy"] == "decode-only":
            assert set(rec["by_reason"]) <= {"decode-only"}
        if rec["policy"] == "harli":
            assert set(rec["by_reason"]) <= {"idle", "steady", "down", "up", "hold",
                                             "infeasible", "probe"}
    assert {s["level"] for s in res["level_samples"]} >= {0}
    png = tmp_path / "bench.png"
    plot(res, png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert verdict(res).startswith("harli kept")


def test_a_second_bench_in_the_same_dir_starts_from_a_fresh_daemon(tmp_path: Path) -> None:
    """`make run` replays its bench in the same .harli/demo/bench dir every time: the second run
    must not meet the first one's job (same name, still queued to resume)."""
    for _ in range(2):
        res = run_bench(tmp_path, 2.0, ["decode-only"], 50.0, 0, 1.0, None, block_s=1.0,
                        settle_s=0.2, resamples=50)
        assert res["errors"] == 0 and len(res["blocks"]) == 6
