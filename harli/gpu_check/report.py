"""``harli gpu-check``'s report: its structs, how it is written, and the pure arithmetic behind
its figures (latency summaries, overlap, GEMM throughput, co-run ratios), kept apart from the
processes that measure them so it is tested on any host."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

REPORT_VERSION = 1
SECTION_STATUSES = ("ok", "error", "skipped")


class Section(msgspec.Struct, kw_only=True):
    """One mechanism: whether it works here, and what was measured."""

    name: str
    status: str = "skipped"  # ok | error | skipped
    reason: str = ""  # for error and skipped: what happened, and what to do
    seconds: float = 0.0  # wall time the check took
    figures: dict[str, Any] = {}


class GpuCheckReport(msgspec.Struct, kw_only=True):
    version: int = REPORT_VERSION
    created_unix_s: float = 0.0
    ok: bool = False  # every section ok or skipped, and CUDA present
    error: str = ""  # why nothing could run (e.g. no CUDA)
    host: dict[str, Any] = {}  # device, driver, CUDA and torch versions, SMs
    sections: list[Section] = []

    def finish(self) -> GpuCheckReport:
        self.ok = not self.error and all(s.status != "error" for s in self.sections)
        return self


def new_report() -> GpuCheckReport:
    return GpuCheckReport(created_unix_s=time.time())


def write_report(path: Path, report: GpuCheckReport) -> None:
    """Pretty JSON, written atomically (a reader never sees half a report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    tmp.replace(path)


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] (numpy's default method)."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float]:
    if not samples_ms:
        raise ValueError("no latency samples")
    return {"n": float(len(samples_ms)), "median_ms": percentile(samples_ms, 50),
            "p99_ms": percentile(samples_ms, 99), "mean_ms": sum(samples_ms) / len(samples_ms),
            "max_ms": max(samples_ms)}


def overlap_figures(solo_s: float, spans: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Two (or more) clients each ran a busy loop that takes ``solo_s`` alone; ``spans`` are
    their (start, end) wall-clock times when run together. ``overlap`` is the sum of their own
    times over the wall time they took together: ~1 when the GPU time-slices them, ~N (the
    number of clients) when their kernels run at the same time."""
    if solo_s <= 0 or not spans:
        raise ValueError("need a positive solo time and at least one span")
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    own = sum(e - s for s, e in spans)
    return {"solo_s": solo_s, "together_wall_s": wall, "sum_of_own_s": own,
            "overlap": own / wall if wall > 0 else math.inf,
            "slowdown_vs_solo": wall / solo_s}


def gemm_tflops(m: int, n: int, k: int, seconds_per_gemm: float) -> float:
    """TFLOP/s of an (m x k) @ (k x n) product: 2mnk floating-point operations."""
    if seconds_per_gemm <= 0:
        raise ValueError(f"a GEMM cannot take {seconds_per_gemm} s")
    return 2.0 * m * n * k / seconds_per_gemm / 1e12


def corun_rows(alone: Mapping[str, float],
               by_level: Mapping[int, Mapping[str, float]]) -> list[dict[str, float]]:
    """One row per level: decode's median/p99 beside the trainer and their ratio to alone."""
    rows = []
    for level in sorted(by_level):
        s = by_level[level]
        rows.append({"level": float(level), "median_ms": s["median_ms"], "p99_ms": s["p99_ms"],
                     "median_ratio": s["median_ms"] / alone["median_ms"],
                     "p99_ratio": s["p99_ms"] / alone["p99_ms"]})
    return rows
