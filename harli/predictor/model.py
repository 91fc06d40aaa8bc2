"""The latency predictor the daemon asks before each decode iteration.

``LatencyModel.predict(shape, level)`` chains stage 1 (solo latency from the batch shape),
stage 2 (the correction for finetune quota level ``level``; level 0 skips it) and the online
bias learnt by ``observe``. The upper bound is the estimate times the fitted
measured/estimate quantile of the stage used, widened when the live spread exceeds the fitted
one. Levels without their own stage fall back to the nearest lower one times a conservative
factor. ``LatencyModel.online(prior_latency_s)`` starts without a profile and learns stage 1
(and stage 2 as a per-level ratio) from live iterations.

``predict`` is pure Python and costs a few microseconds; nothing here does IO or reads a clock
(``observe`` takes ``now``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from harli.predictor.correction import HostDrift, LevelCorrection, RatioEwma
from harli.predictor.features import BatchShape
from harli.predictor.fit import (
    DEFAULT_BIAS_ALPHA,
    LevelFit,
    Sample,
    SoloFit,
    bias_warmup,
    fit_levels,
    fit_solo,
    tail_ratio,
)
from harli.predictor.online import SoloAccumulator

__all__ = [
    "LatencyModel",
    "LatencyModelConfig",
    "LevelFit",
    "Prediction",
    "Sample",
    "SoloFit",
    "fit_levels",
    "fit_solo",
]

logger = logging.getLogger(__name__)

# |log(measured/estimate)| beyond this (a factor ~22000) is a broken measurement, not signal;
# clamping keeps the EWMAs, and the exp() of them, finite.
_MAX_LOG_RATIO = 10.0


class Prediction(NamedTuple):
    """A NamedTuple (immutable) rather than a frozen dataclass: it is built on every predict
    and a tuple is the cheapest immutable record in CPython."""

    estimate_s: float
    upper_s: float


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class LatencyModelConfig:
    ewma_alpha: float = field(default=DEFAULT_BIAS_ALPHA, metadata=_help(
        "weight of each new iteration in the per-level bias and spread EWMAs"))
    drift_threshold_log: float = field(default=0.25, metadata=_help(
        "|bias| in log space (0.15 ~ 16%) at which a drift event is logged and counted"))
    drift_rearm_fraction: float = field(default=0.5, metadata=_help(
        "a drift re-arms once |bias| falls below this share of the threshold"))
    spread_gain: float = field(default=3.0, metadata=_help(
        "upper bound widens by exp(gain * (live - fitted mean |log residual|))"))
    fallback_factor: float = field(default=1.5, metadata=_help(
        "a level without its own fit uses the nearest lower fitted level times this"))
    prior_upper_factor: float = field(default=2.0, metadata=_help(
        "online mode before the first fit: upper = prior_latency_s times this"))
    quantile: float = field(default=0.99, metadata=_help(
        "quantile of measured/estimate the upper bound stands for (the daemon sets it to the "
        "SLO's attainment target): online fits are taken at it, profiled ones read it from "
        "their tail"))
    online_min_samples: int = field(default=50, metadata=_help(
        "online mode: level-0 iterations before the first stage-1 fit"))
    refit_every: int = field(default=200, metadata=_help(
        "online mode: refit stage 1 after this many new level-0 iterations"))
    online_window: int = field(default=1000, metadata=_help(
        "online mode: recent level-0 iterations kept for the upper-bound quantile"))
    ratio_alpha: float = field(default=0.01, metadata=_help(
        "EWMA weight of online stage 2 (measured/solo per level); slower than the bias"))
    level_min_samples: int = field(default=20, metadata=_help(
        "iterations at a level before its online ratio replaces the fallback"))
    error_window: int = field(default=500, metadata=_help(
        "recent iterations over which stats() reports the mean absolute percent error"))
    level_bias_share: float = field(default=0.1, metadata=_help(
        "share of each online bias step kept by the level measured; the rest is the host's "
        "drift, which every level's prediction follows (1 = every level on its own)"))

    def __post_init__(self) -> None:
        for name in ("ewma_alpha", "ratio_alpha", "drift_rearm_fraction", "quantile",
                     "level_bias_share"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.drift_threshold_log <= 0.0 or self.spread_gain < 0.0:
            raise ValueError("drift_threshold_log must be > 0 and spread_gain >= 0")
        if self.fallback_factor < 1.0 or self.prior_upper_factor < 1.0:
            raise ValueError("fallback_factor and prior_upper_factor must be >= 1 (conservative)")
        for name in ("online_min_samples", "refit_every", "online_window", "level_min_samples",
                     "error_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _tracked_ratio(fit: SoloFit | LevelFit, quantile: float) -> tuple[float, bool]:
    """(ratio after the online bias at ``quantile``, whether the fit can give that quantile).
    A fit without a tail keeps its own quantile's ratio; one written before the tracked
    figures existed, its raw ratio."""
    if fit.tracked_tail is not None and fit.tracked_ratio_q is not None:
        if quantile == fit.quantile:
            return fit.tracked_ratio_q, True
        return tail_ratio(fit.tracked_tail, quantile), True
    own = fit.tracked_ratio_q if fit.tracked_ratio_q is not None else fit.ratio_q
    return own, quantile == fit.quantile


def _bounds(fit: SoloFit | LevelFit, quantile: float) -> tuple[float, float, float]:
    """(raw ratio_q, ratio after the online bias at ``quantile``, spread after the bias) of a
    fit. The raw one (used while the bias warms up) stays at the fit's own quantile. A profile
    written before the tracked figures existed uses the raw ones for both."""
    spread_log = fit.tracked_spread_log if fit.tracked_spread_log is not None else \
        fit.spread_log
    return fit.ratio_q, _tracked_ratio(fit, quantile)[0], spread_log


class LatencyModel:
    def __init__(self, solo: SoloFit | None, levels: dict[int, LevelFit], *,
                 config: LatencyModelConfig | None = None,
                 prior_latency_s: float | None = None) -> None:
        self._cfg = config if config is not None else LatencyModelConfig()
        if solo is None and levels:
            raise ValueError("stage-2 level fits need the stage-1 fit they correct")
        if solo is None and (prior_latency_s is None or not prior_latency_s > 0):
            raise ValueError("without a profile the model needs prior_latency_s > 0 "
                             "(use LatencyModel.online(prior_latency_s=...))")
        if any(level < 1 for level in levels):
            raise ValueError(f"stage-2 levels must be >= 1, got {sorted(levels)}")
        self._solo = solo
        self._levels = dict(levels)
        # _bounds of each fit at the bound's quantile (0: stage 1), computed once per fit.
        self._fit_bounds: dict[int, tuple[float, float, float]] = {
            level: _bounds(lf, self._cfg.quantile) for level, lf in self._levels.items()}
        if solo is not None:
            self._fit_bounds[0] = _bounds(solo, self._cfg.quantile)
            if not _tracked_ratio(solo, self._cfg.quantile)[1]:
                logger.warning("[predictor] the profile's bound is at quantile %g, not %g: it "
                               "predates per-quantile tails (harli profile --refit)",
                               solo.quantile, self._cfg.quantile)
        # _tracked_at's cache: (fit key, quantile) -> ratio after the bias at that quantile.
        self._quantile_bounds: dict[tuple[int, float], float] = {}
        self._quantile = self._cfg.quantile
        # predict's one-entry memo of the solo estimate (shapes are immutable).
        self._last_shape: BatchShape | None = None
        self._last_solo: SoloFit | None = None
        self._last_solo_s = 0.0
        self._quantile_unsupported = 0
        self._profile_loaded = solo is not None
        self._accumulator = None if solo is not None else SoloAccumulator(self._cfg.online_window)
        prior = prior_latency_s if prior_latency_s is not None else 0.0
        self._prior = Prediction(prior, prior * self._cfg.prior_upper_factor)
        self._since_fit = 0
        self._refits = 0
        # Online mode: when (``observe``'s ``now``) stage 1 was first and last fit from live
        # iterations, and when each level's own online stage (its ratio) took over.
        self._first_fit_s: float | None = None
        self._last_fit_s: float | None = None
        self._learnt_s: dict[int, float] = {}
        self._ratios: dict[int, RatioEwma] = {}
        # One online correction per (level, iteration has prefill): a slowdown of this host
        # hits overhead-bound decode iterations and compute-bound prefill iterations
        # differently (measured in one run: +57 % and +39 %), so one bias for both overcorrects
        # the rarer prefill iterations.
        self._corrections: dict[tuple[int, bool], LevelCorrection] = {}
        # The host's share of the biases, one per kind of iteration as above.
        self._host = {False: HostDrift(), True: HostDrift()}
        self._seen: dict[int, int] = {}
        self._fallbacks: dict[int, int] = {}
        self._last_drift_s: dict[int, float] = {}
        self._errors: deque[float] = deque(maxlen=self._cfg.error_window)
        # Iterations of a (level, prefill) correction before its bias is trusted (see
        # fit.tracked_bound, which leaves the same warm-up out of its quantile).
        self._warmup = bias_warmup(self._cfg.ewma_alpha)
        # upper_bounds' fast path, by level: the stage line (scale, offset_s, floor_s) of each
        # level with a stage of its own (level 0: the identity; a fitted level: its fit; an
        # online level: its ratio, kept current as it learns), and per kind of iteration the
        # level's correction once it is warm; None where a level takes _at_level's general
        # path (a fallback stage, or a bias still warming up). A decision runs after the
        # daemon's loop has done everything else, on caches the finetune's threads share:
        # cold, so what it costs is what it touches (measured: 29 us median in the daemon
        # against 12 us in a warm loop), and lists by level touch less than dicts by (level,
        # kind).
        top = max(self._levels, default=0)
        self._lines: list[tuple[float, float, float] | None] = [
            (1.0, 0.0, 0.0), *((lf.scale, lf.offset_s, lf.floor_s) if lf is not None else None
                               for lf in map(self._levels.get, range(1, top + 1)))]
        self._warm: dict[bool, list[LevelCorrection | None]] = {
            False: [None] * (top + 1), True: [None] * (top + 1)}
        # The tracked ratio at a quantile of each level's own fit, by level (None: the level
        # has no fit), per quantile asked (None: the configured one); cleared on a refit.
        self._tracked_by_q: dict[float | None, list[float | None]] = {}

    @classmethod
    def online(cls, prior_latency_s: float, *,
               config: LatencyModelConfig | None = None) -> LatencyModel:
        """A model with no profile: predicts the conservative prior until it has fit stage 1
        from live level-0 iterations."""
        return cls(None, {}, config=config, prior_latency_s=prior_latency_s)

    # -- hot path ---------------------------------------------------------------------------

    def predict(self, shape: BatchShape, level: int,
                quantile: float | None = None) -> Prediction:
        """Latency of the next iteration with batch ``shape`` beside the finetune at quota
        ``level`` (0 = alone): (estimate_s, upper_s) with upper_s >= estimate_s > 0. The bound
        stands for ``quantile`` of the latency (None: ``LatencyModelConfig.quantile``), read from
        the fit's tail; while a bias warms up it is the raw bound at the fit's own quantile."""
        solo = self._solo
        if solo is None:
            return self._prior
        prefill = shape.prefill_tokens > 0
        return self._at_level(level, self._solo_estimate(solo, shape), prefill,
                              self._other_quantile(quantile))

    def upper_bounds(self, shape: BatchShape, top_level: int,
                     quantile: float | None = None) -> list[float]:
        """``predict(shape, level, quantile).upper_s`` of every level 0..``top_level``: the
        policy asks all of them before every decode iteration, so the shape's solo estimate
        and the quantile are read once, not once a level."""
        if top_level < 0:
            raise ValueError(f"quota level must be >= 0, got {top_level}")
        solo = self._solo
        if solo is None:
            return [self._prior.upper_s] * (top_level + 1)
        solo_s = self._solo_estimate(solo, shape)
        prefill = shape.prefill_tokens > 0
        other = self._other_quantile(quantile)
        tracked = self._tracked_by_q.get(other) or self._tracked_list(other)
        warm, lines = self._warm[prefill], self._lines
        host = self._host[prefill].factor
        out = []
        for level in range(top_level + 1):
            corr = warm[level] if level < len(warm) else None
            if corr is None:
                out.append(self._at_level(level, solo_s, prefill, other).upper_s)
                continue
            # _at_level's arithmetic for a fitted level with a warm bias, in the same order
            # (equal to the last bit: test_upper_bounds_are_predict_of_every_level).
            scale, offset_s, floor_s = lines[level]  # type: ignore[misc]  # warm: fitted
            estimate_s = scale * solo_s + offset_s
            if not estimate_s > floor_s:
                estimate_s = floor_s
            estimate_s *= host * corr.own_factor
            out.append(estimate_s * tracked[level] * corr.spread_factor)  # type: ignore[operator]
        return out

    def _tracked_list(self, other_quantile: float | None) -> list[float | None]:
        """``_tracked_by_q[other_quantile]``, filled on its first use."""
        tracked: list[float | None] = []
        for level, line in enumerate(self._lines):
            key = level if level == 0 or level in self._levels else 0  # online: stage 1's
            if line is None:
                tracked.append(None)
            elif other_quantile is None:
                tracked.append(self._fit_bounds[key][1])
            else:
                tracked.append(self._quantile_bounds.get((key, other_quantile)) or
                               self._tracked_at(key, other_quantile))
        self._tracked_by_q[other_quantile] = tracked
        return tracked

    def _other_quantile(self, quantile: float | None) -> float | None:
        """``quantile`` if it is not the configured one (whose ratios ``_fit_bounds`` holds)."""
        return None if quantile is None or quantile == self._quantile else quantile

    def _at_level(self, level: int, solo_s: float, prefill: bool,
                  other_quantile: float | None) -> Prediction:
        """``predict`` at ``level`` for an iteration whose solo estimate is ``solo_s``."""
        estimate_s, key, fallback = self._stage(level, solo_s)
        if fallback:
            self._fallbacks[level] = self._fallbacks.get(level, 0) + 1
        ratio_q, tracked_q, _ = self._fit_bounds[key]
        corr = self._corrections.get((level, prefill))
        if corr is None or corr.n < self._warmup:
            # No bias learnt yet: the raw quantile, which covers the host's drift as well.
            return Prediction(estimate_s, estimate_s * ratio_q)
        if other_quantile is not None:
            tracked_q = self._quantile_bounds.get((key, other_quantile)) or \
                self._tracked_at(key, other_quantile)
        estimate_s *= self._host[prefill].factor * corr.own_factor
        return Prediction(estimate_s, estimate_s * tracked_q * corr.spread_factor)

    def slowdown(self, shape: BatchShape, level: int) -> float:
        """How many times slower the fits say an iteration of ``shape`` runs beside the
        finetune at ``level`` than alone: stage 2 over stage 1, without the online bias (a
        level's bias is only as fresh as the last time it ran, so biased estimates of two
        levels are not comparable). Before stage 1 is fit: infinite for levels above 0."""
        solo = self._solo
        if level == 0:
            return 1.0
        if solo is None:
            return math.inf
        solo_s = self._solo_estimate(solo, shape)
        return self._stage(level, solo_s)[0] / solo_s

    def measured(self, level: int) -> bool:
        """Whether ``level``'s prediction stands on a stage of its own: stage 1 fitted (level
        0), a profile's fit, or an online ratio learnt from ``level_min_samples`` iterations;
        not the prior or a fallback from the level below."""
        if self._solo is None:
            return False
        if level == 0 or level in self._levels:
            return True
        ratio = self._ratios.get(level)
        return ratio is not None and ratio.n >= self._cfg.level_min_samples

    def _solo_estimate(self, solo: SoloFit, shape: BatchShape) -> float:
        """``solo.estimate(shape)``, once per shape: a policy asks every level (and, for a
        load over the SLO, every slowdown) of one shape in a row."""
        if shape is self._last_shape and solo is self._last_solo:
            return self._last_solo_s
        solo_s = solo.estimate(shape)
        self._last_shape, self._last_solo, self._last_solo_s = shape, solo, solo_s
        return solo_s

    def _stage(self, level: int, solo_s: float) -> tuple[float, int, bool]:
        """At ``level``: (estimate before the online bias, the key in ``_fit_bounds`` of the
        fit whose bounds apply, is fallback)."""
        if level == 0:
            return solo_s, 0, False
        lf = self._levels.get(level)
        if lf is not None:
            return lf.estimate(solo_s), level, False
        ratio = self._ratios.get(level)
        if ratio is not None and ratio.n >= self._cfg.level_min_samples:
            return solo_s * ratio.ratio, 0, False
        if level < 0:
            raise ValueError(f"quota level must be >= 0, got {level}")
        lower_s, key, _ = self._stage(self._nearest_lower(level), solo_s)
        return lower_s * self._cfg.fallback_factor, key, True

    def _tracked_at(self, key: int, quantile: float) -> float:
        """The bound's ratio after the online bias at ``quantile`` for the fit under ``key``,
        from its tail, stored in ``_quantile_bounds`` (predict reads that first and calls this
        on a miss: a policy asks a handful of quantiles). A fit without a tail (a profile older
        than them) keeps its own quantile's ratio; that is logged once per quantile and
        counted in ``stats()['quantile_unsupported']``."""
        fit = self._solo if key == 0 else self._levels[key]
        assert fit is not None
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        ratio, exact = _tracked_ratio(fit, quantile)
        if not exact:
            self._quantile_unsupported += 1
            logger.warning("[predictor] the fit of level %d has no tail (a profile written "
                           "before them; harli profile --refit): its bound stays at quantile "
                           "%g, not %g", key, fit.quantile, quantile)
        self._quantile_bounds[(key, quantile)] = ratio
        return ratio

    def _nearest_lower(self, level: int) -> int:
        for lower in range(level - 1, 0, -1):
            ratio = self._ratios.get(lower)
            if lower in self._levels or (ratio is not None
                                         and ratio.n >= self._cfg.level_min_samples):
                return lower
        return 0

    # -- online correction ------------------------------------------------------------------

    def observe(self, shape: BatchShape, level: int, measured_s: float, now: float) -> None:
        """Fold in a measured iteration: per-level bias and spread, drift detection, online
        stage 2 for levels without a fit, and (online mode) stage-1 refits."""
        if level < 0:
            raise ValueError(f"quota level must be >= 0, got {level}")
        if not (measured_s > 0.0 and math.isfinite(measured_s)):
            raise ValueError(f"measured_s must be finite and > 0, got {measured_s}")
        self._seen[level] = self._seen.get(level, 0) + 1
        if self._solo is None:
            self._errors.append(abs(measured_s / self._prior.estimate_s - 1.0))
        else:
            self._correct(shape, level, measured_s, now)
        if self._accumulator is not None and level == 0:
            self._learn_solo(shape, measured_s, now)

    def _correct(self, shape: BatchShape, level: int, measured_s: float, now: float) -> None:
        solo = self._solo
        assert solo is not None
        solo_s = solo.estimate(shape)
        base_s, fit_key, fallback = self._stage(level, solo_s)
        fitted_spread_log = self._fit_bounds[fit_key][2]
        key = (level, shape.prefill_tokens > 0)
        corr = self._corrections.get(key)
        if corr is None:
            cfg = self._cfg
            corr = LevelCorrection(cfg.ewma_alpha, cfg.drift_threshold_log,
                                   cfg.drift_threshold_log * cfg.drift_rearm_fraction,
                                   cfg.spread_gain, fitted_spread_log, cfg.level_bias_share)
            self._corrections[key] = corr
        host = self._host[key[1]]
        self._errors.append(abs(measured_s / (base_s * host.factor * corr.own_factor) - 1.0))
        log_ratio = min(_MAX_LOG_RATIO, max(-_MAX_LOG_RATIO, math.log(measured_s / base_s)))
        if corr.n + 1 >= self._warmup and not fallback:  # a stage of the level's own
            self._mark_warm(level, key[1], corr)  # its bias is trusted from this update on
        if corr.update(log_ratio, fitted_spread_log, host, detect_drift=not fallback):
            self._last_drift_s[level] = now
            logger.warning("[predictor] drift at level %d: measured/predicted %+.1f%% "
                           "(threshold %.1f%%) at t=%.3f s, event %d", level,
                           100.0 * math.expm1(corr.bias_log(host)),
                           100.0 * math.expm1(self._cfg.drift_threshold_log), now,
                           corr.drift_events)
        if level > 0 and level not in self._levels:
            ratio = self._ratios.setdefault(level, RatioEwma(self._cfg.ratio_alpha))
            ratio.update(measured_s / solo_s)
            if ratio.n == self._cfg.level_min_samples:
                corr.reset_bias()  # its base moves from the fallback to its own ratio
                self._tracked_by_q.clear()  # a new line: the lists by level grow
                self._learnt_s[level] = now
            if ratio.n >= self._cfg.level_min_samples:
                self._grow(level)
                self._lines[level] = (ratio.ratio, 0.0, 0.0)

    def _grow(self, level: int) -> None:
        """Make the fast path's lists by level reach ``level`` (an online level past the top
        fitted one)."""
        while len(self._lines) <= level:
            self._lines.append(None)
            self._warm[False].append(None)
            self._warm[True].append(None)

    def _mark_warm(self, level: int, prefill: bool, corr: LevelCorrection) -> None:
        """The level's own stage has a trusted bias for this kind of iteration: from now on
        ``upper_bounds`` takes the fast path for it."""
        self._grow(level)
        if self._lines[level] is not None:
            self._warm[prefill][level] = corr

    def _learn_solo(self, shape: BatchShape, measured_s: float, now: float) -> None:
        acc = self._accumulator
        assert acc is not None
        acc.add(shape, measured_s)
        self._since_fit += 1
        cfg = self._cfg
        first = self._solo is None and acc.n >= max(cfg.online_min_samples, acc.n_features())
        if first or (self._solo is not None and self._since_fit >= cfg.refit_every):
            self._solo = acc.fit(cfg.quantile, cfg.ewma_alpha)
            self._fit_bounds[0] = _bounds(self._solo, cfg.quantile)
            self._quantile_bounds.clear()
            self._tracked_by_q.clear()
            self._since_fit = 0
            self._refits += 1
            if self._first_fit_s is None:
                self._first_fit_s = now
            self._last_fit_s = now
            logger.info("[predictor] online stage-1 refit %d on %d level-0 iterations",
                        self._refits, acc.n)

    # -- introspection ----------------------------------------------------------------------

    @property
    def solo(self) -> SoloFit | None:
        return self._solo

    @property
    def levels(self) -> dict[int, LevelFit]:
        return dict(self._levels)

    def stats(self) -> dict[str, object]:
        errors = self._errors
        drift: dict[int, int] = {}
        for (lv, _), c in self._corrections.items():
            drift[lv] = drift.get(lv, 0) + c.drift_events
        return {
            "mode": "online" if self._accumulator is not None else "profile",
            "profile_loaded": self._profile_loaded,
            "fitted": self._solo is not None,
            "online_refits": self._refits,
            "first_fit_s": self._first_fit_s,
            "last_fit_s": self._last_fit_s,
            "levels_learnt_s": dict(self._learnt_s),
            "bound_quantile": self._cfg.quantile,
            "quantile_unsupported": self._quantile_unsupported,
            "samples_seen": dict(self._seen),
            # Per level, of the decode-only iterations (the common kind) ...
            "bias": {lv: math.expm1(c.bias_log(self._host[pf]))
                     for (lv, pf), c in self._corrections.items() if not pf},
            "spread_factor": {lv: c.spread_factor for (lv, pf), c in self._corrections.items()
                              if not pf},
            # ... and of both kinds.
            "drift_events": drift,
            "in_drift": sorted({lv for (lv, _), c in self._corrections.items() if c.in_drift}),
            "last_drift_s": dict(self._last_drift_s),
            "fallback_predictions": dict(self._fallbacks),
            "online_levels": sorted(lv for lv, r in self._ratios.items()
                                    if r.n >= self._cfg.level_min_samples),
            "recent_mean_abs_pct_error": (100.0 * sum(errors) / len(errors)) if errors else None,
        }
