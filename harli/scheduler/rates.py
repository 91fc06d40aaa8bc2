"""Finetune throughput per quota level while decode runs, as measured: which feasible level
trains the most.

``HarliPolicy`` takes the largest feasible level because on a GPU more SMs train faster. That
is not so on every backend: on CPU the levels above the finetune's own cores add a thread on
decode's core, which (in the idle scheduling class) runs only when decode blocks, and the
OpenMP pool waits for it at every parallel region, so while decode is busy such a level trains
*slower* than the own-core level below it (measured: static:2 2484 vs static:4 2121 tok/s in
one bench). ``LevelRates`` keeps an EWMA of the finetune's tokens/s per level from micro-steps
that ran wholly at one level while decode was busy, and ``best(upto)`` names the level in
1..upto that trained fastest among the measured ones, or ``upto`` itself while that has fewer
than ``min_samples`` measurements (so a fresh daemon acts as plain harli, and a lower level is
only chosen once it has been measured: at a time the SLO allowed no more, or under a static
policy).

Rates belong to one job (a new job has other shapes); ``observe`` starts over when the job
changes. Pure logic: no clock, no IO.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["LevelRates"]


class LevelRates:
    def __init__(self, levels: int, alpha: float = 0.2, min_samples: int = 3) -> None:
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self.levels = levels
        self.alpha = alpha
        self.min_samples = min_samples
        self.job_id: int | None = None
        self.rate_tok_s = [0.0] * (levels + 1)  # index = level; 0 is the pause
        self.samples = [0] * (levels + 1)
        self._best = list(range(levels + 1))  # _best[upto]: best(upto), kept up to date

    def observe(self, job_id: int, level: int, tokens: int, seconds: float) -> None:
        """A micro-step of job ``job_id`` trained ``tokens`` in ``seconds`` (its duty-cycle
        idle included) wholly at ``level`` while decode was busy."""
        if not 1 <= level <= self.levels:
            raise ValueError(f"level must be in 1..{self.levels}, got {level}")
        if tokens < 0 or not (seconds > 0.0 and math.isfinite(seconds)):
            raise ValueError(f"need tokens >= 0 and finite seconds > 0, got {tokens} in "
                             f"{seconds}")
        if job_id != self.job_id:
            self.job_id = job_id
            self.rate_tok_s = [0.0] * (self.levels + 1)
            self.samples = [0] * (self.levels + 1)
        rate = tokens / seconds
        n = self.samples[level]
        # The first sample sets the rate; later ones move it by alpha.
        self.rate_tok_s[level] = rate if n == 0 else \
            self.rate_tok_s[level] + self.alpha * (rate - self.rate_tok_s[level])
        self.samples[level] = n + 1
        self._recompute()

    def best(self, upto: int, skipped: Sequence[int] = ()) -> int:
        """The level in 1..``upto``, outside ``skipped``, to run at while decode is busy
        (``upto`` itself when it is 0 or unmeasured; it is never in ``skipped``). O(1) when
        nothing is skipped, O(levels) otherwise."""
        if not 0 <= upto <= self.levels:
            return upto
        if not skipped or self.samples[upto] < self.min_samples:
            return self._best[upto]  # upto itself when unmeasured, and it is never skipped
        top = upto
        for level in range(1, upto):
            if level not in skipped and self.samples[level] >= self.min_samples and \
                    self.rate_tok_s[level] > self.rate_tok_s[top]:
                top = level
        return top

    def _recompute(self) -> None:
        best = [0]
        top = 0  # the best of 1..upto so far, among measured levels
        for upto in range(1, self.levels + 1):
            if self.samples[upto] >= self.min_samples and (
                    top == 0 or self.rate_tok_s[upto] > self.rate_tok_s[top]):
                top = upto
            # The allowed level itself until it is measured (plain harli's choice, which also
            # measures it); then the fastest measured one up to it. No level below the
            # allowed one is run just to measure it: one that never completes a micro-step
            # beside a busy decode would be chosen forever.
            best.append(upto if self.samples[upto] < self.min_samples else top)
        self._best = best

    def snapshot(self) -> dict[int, float]:
        """Measured rates (tokens/s) by level, of levels with ``min_samples`` or more."""
        return {lv: self.rate_tok_s[lv] for lv in range(1, self.levels + 1)
                if self.samples[lv] >= self.min_samples}
