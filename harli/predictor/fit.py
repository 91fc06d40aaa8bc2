"""Offline fits of the two-stage latency model from profiled iterations.

Stage 1 (``fit_solo``) regresses a solo decode iteration's latency on the batch features;
stage 2 (``fit_levels``) maps the solo estimate to the latency beside the finetune at each
quota level, ``measured ~= scale_L * solo + offset_L``. Both weight each sample by
1/latency^2, i.e. they minimize relative error: a 2 ms error matters at 10 ms, not at 200 ms.

Fitting uses numpy; the fitted objects' ``estimate`` methods are pure Python because they run
before every decode iteration.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from harli.predictor.features import FEATURE_NAMES, BatchShape, vector

DEFAULT_QUANTILE = 0.99
# The weight of each new iteration in the daemon's per-level online bias (``LatencyModelConfig``'s
# ``ewma_alpha``); the fits replay that bias over their samples to measure the spread left
# after it (``tracked_ratio_q``).
DEFAULT_BIAS_ALPHA = 0.05
# Where the fits keep the tail of that spread, so that the daemon can take its bound at the
# SLO's attainment target rather than only at the fit's quantile (1.0: the largest seen).
TAIL_QUANTILES = (0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)

# A prediction never goes below this share of the fastest iteration seen in the fit: a linear
# fit may extrapolate to <= 0 for shapes smaller than any profiled one.
FLOOR_FRACTION = 0.5
# Below this relative spread of solo estimates a level's scale and offset cannot be told
# apart, so the level is fit as a pure scale.
_MIN_SOLO_SPREAD = 0.01


def bias_warmup(alpha: float) -> int:
    """Iterations an online bias of weight ``alpha`` needs before it is trusted (~1/alpha,
    its effective memory); until then the daemon uses the raw bound."""
    return math.ceil(1.0 / alpha)


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured decode iteration; ``config`` names the measured configuration
    (e.g. "b8-c512-decode") so evaluation can take per-configuration medians."""

    shape: BatchShape
    level: int  # finetune quota level beside it; 0 = decode alone
    latency_s: float
    config: str

    def __post_init__(self) -> None:
        if self.level < 0:
            raise ValueError(f"sample level must be >= 0, got {self.level}")
        if not self.latency_s > 0:
            raise ValueError(f"sample latency_s must be > 0, got {self.latency_s}")


@dataclass(frozen=True, slots=True)
class SoloFit:
    """Stage 1: solo latency = coefficients . vector(shape), floored at ``floor_s``."""

    coefficients: tuple[float, ...]  # one per FEATURE_NAMES; 0 for features absent from the fit
    feature_names: tuple[str, ...]
    n: int
    quantile: float
    ratio_q: float  # q-quantile of measured/estimate over the fit samples, >= 1
    spread_log: float  # mean |log(measured/estimate)| over the fit samples
    floor_s: float
    # The same two figures after the daemon's online bias, and that ratio's tail at
    # TAIL_QUANTILES: see ``tracked_bound``. None in profiles written before they existed
    # (the model then uses ratio_q and spread_log).
    tracked_ratio_q: float | None = None
    tracked_spread_log: float | None = None
    tracked_tail: tuple[float, ...] | None = None

    def estimate(self, shape: BatchShape) -> float:
        est = sum(c * x for c, x in zip(self.coefficients, vector(shape), strict=True))
        return est if est > self.floor_s else self.floor_s


@dataclass(frozen=True, slots=True)
class LevelFit:
    """Stage 2 at one quota level: latency = scale * solo_estimate + offset_s."""

    level: int
    scale: float
    offset_s: float
    n: int
    quantile: float
    ratio_q: float
    spread_log: float
    floor_s: float
    tracked_ratio_q: float | None = None  # as in SoloFit
    tracked_spread_log: float | None = None
    tracked_tail: tuple[float, ...] | None = None

    def estimate(self, solo_s: float) -> float:
        est = self.scale * solo_s + self.offset_s
        return est if est > self.floor_s else self.floor_s


def fit_solo(samples: Iterable[Sample], *, quantile: float = DEFAULT_QUANTILE,
             bias_alpha: float = DEFAULT_BIAS_ALPHA) -> SoloFit:
    """Weighted least squares of level-0 latency on the feature vector. Features whose column
    is all zero in the data are left out (coefficient 0). ``samples`` in the order they were
    measured: the tracked bound replays the online bias over them."""
    _check_quantile(quantile)
    solo = [s for s in samples if s.level == 0]
    x = np.array([vector(s.shape) for s in solo], dtype=np.float64).reshape(-1, len(FEATURE_NAMES))
    y = np.array([s.latency_s for s in solo], dtype=np.float64)
    active = np.any(x != 0.0, axis=0)
    n_active = int(active.sum())
    if len(solo) < max(n_active, 1):
        names = ", ".join(n for n, a in zip(FEATURE_NAMES, active, strict=True) if a)
        raise ValueError(f"fit_solo: {len(solo)} level-0 samples for {n_active} features "
                         f"({names}); profile more configurations")
    coefficients = np.zeros(len(FEATURE_NAMES))
    # Dividing rows by y turns ordinary least squares into weights 1/y^2.
    coefficients[active] = _robust_lstsq(x[:, active] / y[:, None])
    return solo_fit_from(tuple(float(c) for c in coefficients), [s.shape for s in solo],
                         [s.latency_s for s in solo], quantile=quantile,
                         bias_alpha=bias_alpha)


def _robust_lstsq(design: Any, passes: int = 2, cut_mads: float = 3.0) -> Any:
    """Least squares of ``design @ c ~= 1`` (rows already divided by the measured latency, so
    residuals are relative), refit without the rows whose residual is an outlier (beyond
    ``cut_mads`` robust deviations). Iteration times on a shared host have rare long spikes
    (preempted vCPU, page faults); left in, they pull the fit above the typical iteration,
    which is what the estimate stands for (the bound covers the spikes)."""
    keep = np.ones(design.shape[0], dtype=bool)
    sol = np.linalg.lstsq(design, np.ones(design.shape[0]), rcond=None)[0]
    for _ in range(passes):
        resid = design @ sol - 1.0
        med = float(np.median(resid[keep]))
        mad = 1.4826 * float(np.median(np.abs(resid[keep] - med)))
        if mad <= 0:
            break
        new_keep = np.abs(resid - med) <= cut_mads * mad
        if new_keep.sum() < design.shape[1] or (new_keep == keep).all():
            break
        keep = new_keep
        sol = np.linalg.lstsq(design[keep], np.ones(int(keep.sum())), rcond=None)[0]
    return sol


def solo_fit_from(coefficients: tuple[float, ...], shapes: Sequence[BatchShape],
                  latencies_s: Sequence[float], *, quantile: float,
                  bias_alpha: float = DEFAULT_BIAS_ALPHA) -> SoloFit:
    """A ``SoloFit`` with these coefficients, its bounds and floor taken from these samples,
    in the order they were measured (shared by the offline fit and the online refit)."""
    floor_s = FLOOR_FRACTION * min(latencies_s)
    bare = SoloFit(coefficients, FEATURE_NAMES, len(shapes), quantile, 1.0, 0.0, floor_s)
    predicted = [bare.estimate(shape) for shape in shapes]
    ratio_q, spread_log = _bound(latencies_s, predicted, quantile)
    tracked = tracked_bound(latencies_s, predicted, [shape.prefill_tokens > 0 for shape in shapes],
                            quantile=quantile, alpha=bias_alpha)
    return SoloFit(coefficients, FEATURE_NAMES, len(shapes), quantile, ratio_q, spread_log,
                   floor_s, *tracked)


def fit_levels(samples: Iterable[Sample], solo: SoloFit, *, quantile: float = DEFAULT_QUANTILE,
               min_samples: int = 3,
               bias_alpha: float = DEFAULT_BIAS_ALPHA) -> dict[int, LevelFit]:
    """Per quota level L > 0: ``measured ~= scale_L * solo.estimate + offset_L``, fit with
    relative weighting. A level with fewer than ``min_samples`` samples is an error."""
    _check_quantile(quantile)
    by_level: dict[int, list[Sample]] = {}
    for s in samples:
        if s.level > 0:
            by_level.setdefault(s.level, []).append(s)
    fits: dict[int, LevelFit] = {}
    for level in sorted(by_level):
        group = by_level[level]
        if len(group) < max(min_samples, 2):
            raise ValueError(f"fit_levels: level {level} has {len(group)} samples, needs at "
                             f"least {max(min_samples, 2)}; profile it longer or drop it")
        solo_s = np.array([solo.estimate(s.shape) for s in group])
        y = np.array([s.latency_s for s in group])
        if solo_s.max() / solo_s.min() - 1.0 < _MIN_SOLO_SPREAD:
            scale, offset_s = float(np.mean(y / solo_s)), 0.0  # one operating point: scale only
        else:
            design = np.column_stack([solo_s, np.ones_like(solo_s)]) / y[:, None]
            sol = _robust_lstsq(design)
            scale, offset_s = float(sol[0]), float(sol[1])
        floor_s = FLOOR_FRACTION * float(y.min())
        predicted = [max(scale * s + offset_s, floor_s) for s in solo_s.tolist()]
        ratio_q, spread_log = _bound(y.tolist(), predicted, quantile)
        tracked = tracked_bound(y.tolist(), predicted,
                                [s.shape.prefill_tokens > 0 for s in group],
                                quantile=quantile, alpha=bias_alpha)
        fits[level] = LevelFit(level, scale, offset_s, len(group), quantile, ratio_q, spread_log,
                               floor_s, *tracked)
    return fits


def _bound(measured_s: Sequence[float], predicted_s: Sequence[float],
           quantile: float) -> tuple[float, float]:
    """(q-quantile of measured/predicted floored at 1, mean |log(measured/predicted)|)."""
    ratios = np.asarray(measured_s, dtype=np.float64) / np.asarray(predicted_s, dtype=np.float64)
    ratio_q = max(1.0, float(np.quantile(ratios, quantile)))
    spread_log = float(np.mean(np.abs(np.log(ratios))))
    return ratio_q, spread_log


class TrackedBound(NamedTuple):
    ratio_q: float  # the fit's quantile of measured / (estimate x online bias), >= 1
    spread_log: float  # mean |log| of the same
    tail: tuple[float, ...]  # the same ratio at each of TAIL_QUANTILES, >= 1


def tracked_bound(measured_s: Sequence[float], predicted_s: Sequence[float],
                  keys: Sequence[object], *, quantile: float,
                  alpha: float = DEFAULT_BIAS_ALPHA) -> TrackedBound:
    """``_bound`` of what the daemon's prediction misses *after* its online bias, plus its
    tail at ``TAIL_QUANTILES`` (for an attainment target other than the fit's quantile).

    The daemon multiplies each estimate by an EWMA (weight ``alpha``, starting at 1) of the
    measured/estimate ratios seen before it, one per key (``LatencyModel`` keys them by
    whether the iteration has prefill). Replaying that over the samples in measured order
    gives the spread the bias leaves. On a host whose speed drifts for seconds at a time
    (this VM: ~1.4x), the raw ratio's quantile counts the drift as spread although the bias
    follows it, so a bound of bias x raw quantile counts it twice."""
    warmup = bias_warmup(alpha)
    biases_log: dict[object, tuple[int, float]] = {}
    residuals_log: list[float] = []
    for m, p, key in zip(measured_s, predicted_s, keys, strict=True):
        log_ratio = math.log(m / p)
        n, bias_log = biases_log.get(key, (0, 0.0))
        if n >= warmup:  # before that the daemon uses the raw bound
            residuals_log.append(log_ratio - bias_log)
        biases_log[key] = (n + 1, bias_log + alpha * (log_ratio - bias_log))
    if residuals_log:
        residuals = np.asarray(residuals_log)
    else:  # too few samples to say: no tighter than the raw ratios
        residuals = np.log(np.asarray(measured_s, dtype=np.float64)
                           / np.asarray(predicted_s, dtype=np.float64))
    tail = tuple(max(1.0, math.exp(float(q)))
                 for q in np.quantile(residuals, TAIL_QUANTILES))
    ratio_q = max(1.0, math.exp(float(np.quantile(residuals, quantile))))
    return TrackedBound(ratio_q, float(np.mean(np.abs(residuals))), tail)


def tail_ratio(tail: Sequence[float], quantile: float) -> float:
    """The ratio at ``quantile`` from a tail at ``TAIL_QUANTILES``: linear between the grid
    points in log ratio; below the grid's first point, that point."""
    if quantile <= TAIL_QUANTILES[0]:
        return tail[0]
    for i in range(1, len(TAIL_QUANTILES)):
        hi = TAIL_QUANTILES[i]
        if quantile == hi:
            return tail[i]
        if quantile < hi:
            lo = TAIL_QUANTILES[i - 1]
            w = (quantile - lo) / (hi - lo)
            return math.exp((1.0 - w) * math.log(tail[i - 1]) + w * math.log(tail[i]))
    return tail[-1]


def _check_quantile(quantile: float) -> None:
    if not 0.0 < quantile <= 1.0 or math.isnan(quantile):
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
