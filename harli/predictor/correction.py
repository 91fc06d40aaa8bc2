"""Online correction of one quota level's predictions from live telemetry.

``LevelCorrection`` keeps an EWMA of log(measured/estimate) (a multiplicative bias applied to
later predictions), an EWMA of the absolute residual left after that bias (the live spread,
which widens the upper bound when it exceeds the fitted spread), and the drift state.
``RatioEwma`` is stage 2 learned online: measured/solo for a level that no profile fitted.
Pure Python: ``update`` runs once per decode iteration, so it precomputes the factors that
``predict`` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class LevelCorrection:
    alpha: float
    drift_threshold_log: float
    drift_rearm_log: float
    spread_gain: float
    fitted_spread_log: float
    n: int = 0
    bias_log: float = 0.0
    spread_log: float = 0.0
    drift_events: int = 0
    in_drift: bool = False
    bias_factor: float = 1.0  # exp(bias_log), read by predict
    spread_factor: float = 1.0  # >= 1, multiplies the upper bound, read by predict

    def __post_init__(self) -> None:
        # Start at the fitted spread so the bound only widens once live data says so.
        self.spread_log = self.fitted_spread_log

    def update(self, log_ratio: float, fitted_spread_log: float, *, detect_drift: bool) -> bool:
        """Fold in log(measured / uncorrected estimate); True when the bias just crossed the
        drift threshold (once per crossing: it re-arms below ``drift_rearm_log``). Callers turn
        ``detect_drift`` off while the level runs on a fallback, whose bias is conservative by
        design and would read as drift."""
        self.n += 1
        a = self.alpha
        residual = abs(log_ratio - self.bias_log)  # what the corrected prediction missed by
        self.spread_log += a * (residual - self.spread_log)
        self.bias_log += a * (log_ratio - self.bias_log)
        self.fitted_spread_log = fitted_spread_log
        self.bias_factor = math.exp(self.bias_log)
        # Scaled so the gap between live and fitted mean |residual| reaches a tail bound
        # (P99 of a normal is ~2.9x its mean absolute deviation).
        self.spread_factor = math.exp(self.spread_gain * max(0.0, self.spread_log
                                                             - fitted_spread_log))
        magnitude = abs(self.bias_log)
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
        """Forget the bias when the estimate it was learnt against is replaced (a level's
        fallback gives way to its own online ratio)."""
        self.bias_log = 0.0
        self.bias_factor = 1.0
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
