"""The cost of the work the daemon does before every decode iteration, measured offline:
``HarliPolicy.decide`` and ``LatencyModel.predict`` on a model with known stage-1 and stage-2
fits and an online correction at every level, as in a running daemon.

``python -m harli.bench.decision_cost`` prints mean and p99 microseconds of a decision over a
mixed stream of batches and over a stream of one batch that even decode alone cannot serve,
and the mean cost of one ``predict``. The live figure, with the host's noise in it, is the
``decision p99 us`` column of ``harli bench``.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

from harli.predictor import FEATURE_NAMES, BatchShape, LatencyModel, LevelFit, SoloFit
from harli.scheduler.policy import BatchView, HarliPolicy
from harli.scheduler.slo import SloTarget

LEVELS = 4
SLO = SloTarget(tpot_ms=25.0)
# Seconds: intercept, per seq, per decode token, per prefill token, per 1k context tokens,
# per 1M prefill attention token-pairs, per LoRA batch, per LoRA batch token (the order of
# FEATURE_NAMES).
SOLO_COEFS = (5e-3, 1e-4, 5e-5, 2e-5, 3e-4, 1e-3, 4e-3, 2e-4)
LEVEL_LINES = ((1.15, 5e-4), (1.3, 1e-3), (1.45, 1.5e-3), (1.6, 2e-3))  # (scale, offset_s)


def view(running: int, ctx_per_seq: int = 512, prefill: int = 0) -> BatchView:
    return BatchView(num_running=running, num_waiting=0, decode_tokens=running,
                     prefill_tokens=prefill, context_tokens=running * ctx_per_seq,
                     prefill_attn_tokens=prefill * (prefill + 512))


def _fitted() -> LatencyModel:
    solo = SoloFit(SOLO_COEFS, FEATURE_NAMES, n=1, quantile=0.99, ratio_q=1.05,
                   spread_log=0.0, floor_s=1e-4)
    levels = {lv: LevelFit(lv, scale, offset_s, n=1, quantile=0.99, ratio_q=1.1,
                           spread_log=0.0, floor_s=1e-4)
              for lv, (scale, offset_s) in enumerate(LEVEL_LINES, start=1)}
    return LatencyModel(solo, levels)


def synthetic_model(seed: int = 3, observations: int = 200) -> LatencyModel:
    """A model with the fits above and ``observations`` live iterations at every level
    (measured 0.9-1.2x what the fits say), so that a prediction takes its full path."""
    fits, model = _fitted(), _fitted()
    rng = random.Random(seed)
    for _ in range(observations):
        for lv in range(LEVELS + 1):
            shape = view(rng.randint(1, 48), prefill=rng.choice([0, 0, 0, 256])).shape()
            model.observe(shape, lv, fits.predict(shape, lv).estimate_s * rng.uniform(0.9, 1.2),
                          now=0.0)
    return model


def streams(n: int, seed: int = 3) -> dict[str, list[BatchView]]:
    """``mixed``: batches of 0-64 requests, one in five with a 512-token prefill chunk;
    ``infeasible``: 64 requests every time, over the SLO even at level 0."""
    rng = random.Random(seed)
    return {"mixed": [view(rng.randint(0, 64), prefill=rng.choice([0, 0, 0, 0, 512]))
                      for _ in range(n)],
            "infeasible": [view(64)] * n}


def time_decisions(policy: HarliPolicy, stream: Sequence[BatchView]) -> tuple[float, float]:
    """(mean, p99) microseconds of ``policy.decide`` over ``stream``, one decision at a time."""
    ns: list[int] = []
    clock = time.perf_counter_ns
    for t, v in enumerate(stream):
        start = clock()
        policy.decide(v, float(t))
        ns.append(clock() - start)
    ns.sort()
    return statistics.fmean(ns) / 1000.0, ns[int(0.99 * len(ns))] / 1000.0


def time_predictions(model: LatencyModel, shapes: Sequence[BatchShape], n: int) -> float:
    """Mean microseconds of one ``model.predict`` over ``n`` calls, cycling through ``shapes``
    and levels 0..LEVELS-1."""
    t0 = time.perf_counter()
    for i in range(n):
        model.predict(shapes[i % len(shapes)], i % LEVELS)
    return (time.perf_counter() - t0) / n * 1e6


def run(n: int = 10_000, seed: int = 3) -> dict[str, Any]:
    """Every figure of this benchmark: per stream the decisions' mean and p99 (after a warm-up
    of a tenth of it), and the mean cost of a ``predict``."""
    if n < 10:
        raise ValueError(f"n must be >= 10, got {n}")
    model = synthetic_model(seed)
    out: dict[str, Any] = {"decisions": n, "levels": LEVELS, "decide_us": {}}
    for name, stream in streams(n, seed).items():
        policy = HarliPolicy(model, LEVELS, SLO)
        time_decisions(policy, stream[:n // 10])  # warm-up, not kept
        mean_us, p99_us = time_decisions(policy, stream)
        out["decide_us"][name] = {"mean": mean_us, "p99": p99_us}
    rng = random.Random(seed + 3)
    shapes = [view(rng.randint(1, 64), prefill=rng.choice([0, 0, 256])).shape()
              for _ in range(100)]
    out["predict_mean_us"] = time_predictions(model, shapes, 2 * n)
    return out


def main() -> None:
    from rich.console import Console

    res = run()
    console = Console()
    for name, d in res["decide_us"].items():
        console.print(f"HarliPolicy.decide over {res['decisions']:,} {name} decisions: "
                      f"mean {d['mean']:.2f} us, p99 {d['p99']:.2f} us")
    console.print(f"LatencyModel.predict: mean {res['predict_mean_us']:.2f} us")


if __name__ == "__main__":
    main()
