"""The SLO's error budget: which quantile ``HarliPolicy``'s latency bound should stand for.

The operator's target is a share of *tokens* within the TPOT (say 99 %), not of iterations,
and decode alone can already miss it on a noisy host: a bound at the 0.99 quantile of every
iteration then rules out every level (level 0's own tail is over the SLO) and the finetune
pauses whenever anything runs, while the tokens actually delivered miss far less than the 1 %
allowed. ``ErrorBudget`` counts the tokens measured against the SLO over a window of the last
``window_tokens`` (an exponential decay, so a long-running daemon does not bank a day's
surplus) and turns the share that missed into the per-iteration miss probability the policy
may take next: the target share (1 - attainment) when misses run on target, up to
``max_factor`` times it when few missed, down to nothing when they run over. The quantile
the bound stands for is one minus that, rounded *up* to a point of ``BOUND_QUANTILES`` (the
predictor keeps its tail at those points), so the bound is never looser than the budget
allows.

It starts on target (a prior of ``window_tokens`` tokens missing at exactly the target
share), so a fresh policy bounds at the attainment quantile until measured tokens say
otherwise. Pure logic: no clock, no IO; counts in, a quantile out.
"""

from __future__ import annotations

import bisect
import math

from harli.predictor.fit import TAIL_QUANTILES

__all__ = ["BOUND_QUANTILES", "ErrorBudget"]

# The quantiles a budgeted bound may stand for: the points of the predictor's tail from 0.9
# up, short of its maximum (the attainment target is added to them).
BOUND_QUANTILES = tuple(q for q in TAIL_QUANTILES if 0.9 <= q < 1.0)


class ErrorBudget:
    """Decayed counts of measured tokens and of those over the SLO, and the bound quantile
    they allow."""

    def __init__(self, attainment: float, window_tokens: int, max_factor: float) -> None:
        if not 0.0 < attainment <= 1.0:
            raise ValueError(f"attainment must be in (0, 1], got {attainment}")
        if window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1, got {window_tokens}")
        if not (max_factor >= 1.0 and math.isfinite(max_factor)):
            raise ValueError(f"max_factor must be finite and >= 1, got {max_factor}")
        self.attainment = attainment
        self.window_tokens = window_tokens
        self.max_factor = max_factor
        self._target_miss = 1.0 - attainment
        self._ladder = sorted({*BOUND_QUANTILES, attainment})
        self.tokens_w = float(window_tokens)
        self.missed_w = self._target_miss * window_tokens
        self._quantile = self._compute()

    def on_tokens(self, tokens: int, missed: int) -> None:
        """``tokens`` inter-token gaps measured, ``missed`` of them over the SLO."""
        if not 0 <= missed <= tokens:
            raise ValueError(f"need 0 <= missed <= tokens, got {missed} of {tokens}")
        if not tokens:
            return
        keep = math.exp(-tokens / self.window_tokens)
        self.tokens_w = self.tokens_w * keep + tokens
        self.missed_w = self.missed_w * keep + missed
        self._quantile = self._compute()

    @property
    def miss_share(self) -> float:
        """Share of the window's tokens that missed the SLO (the prior included)."""
        return self.missed_w / self.tokens_w

    @property
    def spare(self) -> bool:
        """The window's tokens miss at most half as often as the target allows: misses to
        spare, which a probe of an unmeasured level may spend."""
        return self.miss_share <= 0.5 * self._target_miss

    @property
    def behind(self) -> bool:
        """The window's tokens miss more often than the target allows: the budget is spent."""
        return self.miss_share > self._target_miss * (1.0 + 1e-9)

    def allowed_miss(self) -> float:
        """Per-iteration miss probability the policy may take next, as a multiple of the
        target miss share: 1 + max_factor x (1 - miss_share / target), within 0..max_factor.
        So 1x on target, the cap once the window's share is down to target / max_factor, and
        nothing once it is over target by 1 / max_factor (with 10: 10 % over)."""
        target = self._target_miss
        if target <= 0.0:
            return 0.0
        factor = 1.0 + self.max_factor * (1.0 - self.miss_share / target)
        return target * min(self.max_factor, max(0.0, factor))

    def quantile(self) -> float:
        """The quantile the latency bound should stand for now (cached; O(1))."""
        return self._quantile

    def _compute(self) -> float:
        # The smallest ladder point at or above 1 - allowed: never looser than allowed. The
        # 1e-12 keeps float noise (1 - 0.01 = 0.99000000000000001) on the intended point.
        need = 1.0 - self.allowed_miss() - 1e-12
        ladder = self._ladder
        i = bisect.bisect_left(ladder, need)
        return ladder[i] if i < len(ladder) else ladder[-1]
