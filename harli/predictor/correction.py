"""Online correction of the quota levels' predictions from live telemetry.

A level's bias is an EWMA of log(measured/estimate), applied to later predictions as a factor,
in two parts: ``HostDrift``, shared by every level (the host's own speed, which moves by tens
of percent within minutes on a shared VM), and the level's own offset from it in
``LevelCorrection``, which also keeps an EWMA of the absolute residual left after the bias (the
live spread, which widens the upper bound when it exceeds the fitted spread) and the drift
state.
``RatioEwma`` is stage 2 learned online: measured/solo for a level that no profile fitted.
Pure Python: ``update`` runs once per decode iteration, so it precomputes the factors that
``predict`` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class HostDrift:
    """The part of every level's bias that belongs to the host, not to the level.

    A bias learnt only while its own level runs goes stale while the policy runs another: on
    this VM, harli's level-0 bias learnt in a slow stretch (+25 %) kept its level-0 bound over
    a 9 ms SLO for minutes after the host sped up, while the bias of level 4, the level in
    use, had followed the host down to -3 %. So most of each step of a level's bias lands
    here, where every level reads it, and only ``LevelCorrection.own_share`` of it stays with
    the level: a level's own offset from the host then changes slowly, and the host's speed as
    fast as before. One level running alone moves its bias exactly as one EWMA of weight
    ``alpha`` would (the tail fitted by ``fit.tracked_bound`` assumes that)."""

    log: float = 0.0
    factor: float = 1.0  # exp(log), read by predict

    def move(self, delta_log: float) -> None:
        self.log += delta_log
        self.factor = math.exp(self.log)


@dataclass(slots=True)
class LevelCorrection:
    alpha: float
    drift_threshold_log: float
    drift_rearm_log: float
    spread_gain: float
    fitted_spread_log: float
    own_share: float = 1.0  # of each bias step kept by the level; the rest is the host's
    n: int = 0
    own_log: float = 0.0  # this level's bias over the host's
    spread_log: float = 0.0
    drift_events: int = 0
    in_drift: bool = False
    own_factor: float = 1.0  # exp(own_log); predict multiplies it by HostDrift.factor
    spread_factor: float = 1.0  # >= 1, multiplies the upper bound, read by predict

    def __post_init__(self) -> None:
        # Start at the fitted spread so the bound only widens once live data says so.
        self.spread_log = self.fitted_spread_log

    def bias_log(self, host: HostDrift) -> float:
        """The level's whole bias: the host's drift and its own offset."""
        return host.log + self.own_log

    def update(self, log_ratio: float, fitted_spread_log: float, host: HostDrift, *,
               detect_drift: bool) -> bool:
        """Fold in log(measured / uncorrected estimate), moving ``host`` by all but
        ``own_share`` of the step; True when the bias just crossed the drift threshold (once
        per crossing: it re-arms below ``drift_rearm_log``). Callers turn ``detect_drift``
        off while the level runs on a fallback, whose bias is conservative by design and would
        read as drift."""
        self.n += 1
        a = self.alpha
        residual = log_ratio - self.bias_log(host)  # what the corrected prediction missed
        self.spread_log += a * (abs(residual) - self.spread_log)
        step = a * residual
        self.own_log += self.own_share * step
        self.own_factor = math.exp(self.own_log)
        host.move((1.0 - self.own_share) * step)
        self.fitted_spread_log = fitted_spread_log
        # Scaled so the gap between live and fitted mean |residual| reaches a tail bound
        # (P99 of a normal is ~2.9x its mean absolute deviation).
        self.spread_factor = math.exp(self.spread_gain * max(0.0, self.spread_log
                                                             - fitted_spread_log))
        magnitude = abs(self.bias_log(host))
        if not detect_drift:
            return False
        if not self.in_drift and magnitude > self.drift_threshold_log:
            self.in_drift = True
            self.drift_events += 1
            return True
        if self.in_drift and magnitude < self.drift_rearm_log:
            self.in_drift = False
        return False

    def reset_bias(self) -> None:
        """Forget the level's own offset when the estimate it was learnt against is replaced
        (a level's fallback gives way to its own online ratio); the host's drift stays."""
        self.own_log = 0.0
        self.own_factor = 1.0
        self.in_drift = False


@dataclass(slots=True)
class RatioEwma:
    """measured/solo at one level: a running mean for the first 1/alpha samples, then an
    EWMA, so the first noisy sample does not dominate."""

    alpha: float
    n: int = 0
    ratio: float = 1.0

    def update(self, ratio: float) -> None:
        self.n += 1
        self.ratio += max(self.alpha, 1.0 / self.n) * (ratio - self.ratio)
