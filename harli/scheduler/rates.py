"""Finetune throughput per quota level while decode runs, as measured: which feasible level
trains the most.

``HarliPolicy`` takes the largest feasible level because on a GPU more SMs train faster. That
is not so on every backend: on CPU the levels above the finetune's own cores add a thread on
decode's core, which (in the idle scheduling class) runs only when decode blocks, and the
OpenMP pool waits for it at every parallel region, so while decode is busy such a level trains
*slower* than the own-core level below it (measured: static:2 2484 vs static:4 2121 tok/s in
one bench). ``LevelRates`` keeps an EWMA of the finetune's tokens/s per level from micro-steps
that ran wholly at one level while decode was busy, and ``best(upto)`` names the level in
1..upto to run: ``upto`` itself while that has fewer than ``min_samples`` measurements (so a
fresh daemon acts as plain harli, unless ``upto`` spills onto decode's cores: see below), then
each lower level in turn until it is measured too (or a bound puts it under a measured level:
see below), then the fastest.

A level slow enough never to finish a micro-step within a busy stretch would stay unmeasured,
and be tried forever. ``observe_unfinished`` takes what such a micro-step does say: it had
``seconds`` at the level beside a busy decode and trained fewer than its ``tokens`` there, so
the level trains at most ``tokens / seconds``, a bound that can only overstate a slow level
(on a 2-core VM, level 4 beside a busy decode trains ~270 tok/s, a micro-step of 1024 tokens
~4 s, where level 2 trains ~1700). The same bound ends the trial of a level at once when it is
under the rate of a level already measured: that level can only be slower, and it is left for
the rest of the job (``left``), so a dip in the measured level's rate does not re-open the trial.

Some levels need no trial at all: ``dominated_by[l] = m`` says level ``m`` runs the same
threads on the same cores as ``l`` with a longer duty cycle (on CPU, level 1 is level 2's one
thread idle half the time, level 3 level 4's two threads idle a quarter), so ``m`` trains at
least as fast as ``l`` beside any decode. While ``m`` (or a level dominating it) is allowed,
``l`` is neither tried nor chosen; when only ``l`` is allowed, ``m``'s rate (or cap) caps it,
so a level 3 under a measured level 2 is left once level 4 is measured, untried. (Tried, levels
3 and 1 took ~2 s of a bench's first harli turn's busy time: 1994 tok/s against ~2900 in the
turns after.)

``spills[l]`` says level ``l`` runs threads on decode's own cores (on CPU, the top levels
spill there once the finetune's cores are used up). While decode is busy such a level competes
with it for its core, and is measured here at a small fraction of the level below it (~270
against ~1700 tok/s). A trial of it before any other level is measured has nothing to be
bounded under, so it would last its whole micro-step, seconds of a fresh job's first busy
stretch; so the levels that do not spill are tried first (from the top), and a spilling one only
then, when ``bound_running`` ends its trial within a fraction of a second if it is slower.

Rates belong to one job (a new job has other shapes); ``observe`` starts over when the job
changes. Pure logic: no clock, no IO.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["LevelRates"]


class LevelRates:
    def __init__(self, levels: int, alpha: float = 0.2, min_samples: int = 3,
                 min_unfinished_s: float = 1.0,
                 dominated_by: Sequence[int | None] = (),
                 spills: Sequence[bool] = ()) -> None:
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        dominated = [*dominated_by, *[None] * (levels + 1 - len(dominated_by))]
        if len(dominated) != levels + 1 or dominated[0] is not None or any(
                m is not None and not level < m <= levels for level, m in enumerate(dominated)):
            raise ValueError(f"dominated_by must name, per level 0..{levels}, None or a higher "
                             f"level up to {levels} (and None for 0), got {list(dominated_by)}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        if not min_unfinished_s > 0.0:
            raise ValueError(f"min_unfinished_s must be > 0, got {min_unfinished_s}")
        self.levels = levels
        self.alpha = alpha
        self.min_samples = min_samples
        self.min_unfinished_s = min_unfinished_s  # shorter stretches bound nothing useful
        if len(spills) > levels + 1:
            raise ValueError(f"spills must name at most levels 0..{levels}, got {list(spills)}")
        self.job_id: int | None = None
        self.dominated_by: list[int | None] = dominated
        spill = [*spills, *[False] * (levels + 1 - len(spills))]
        # The order a trial goes in: the levels that do not spill from the top, then those that
        # do (see the module's docstring).
        self._trial_order = [lv for lv in range(levels, 0, -1) if not spill[lv]] + \
            [lv for lv in range(levels, 0, -1) if spill[lv]]
        self.spills = spill
        self._reset()

    def _reset(self) -> None:
        """An empty table (a new job)."""
        n = self.levels + 1
        self.rate_tok_s = [0.0] * n  # index = level; 0 is the pause
        self.samples = [0] * n
        # The lowest bound observe_unfinished or bound_running has seen per level (inf: none).
        self.cap_tok_s = [math.inf] * n
        # Levels left for this job: their cap fell under a measured level's rate once. Not
        # tried again when that rate later dips under the cap (otherwise each dip of
        # level 2's EWMA re-opens a ~0.5-s trial of levels 1 and 3: ~20 % of harli's busy
        # time).
        self.left = [False] * n
        self._best = list(range(n))  # _best[upto]: best(upto), kept up to date
        self._recompute()

    def observe(self, job_id: int, level: int, tokens: int, seconds: float) -> None:
        """A micro-step of job ``job_id`` trained ``tokens`` in ``seconds`` (its duty-cycle
        idle included) wholly at ``level`` while decode was busy."""
        rate = self._checked(job_id, level, tokens, seconds)
        n = self.samples[level]
        # The first sample sets the rate; later ones move it by alpha.
        self.rate_tok_s[level] = rate if n == 0 else \
            self.rate_tok_s[level] + self.alpha * (rate - self.rate_tok_s[level])
        self.samples[level] = n + 1
        self._recompute()

    def observe_unfinished(self, job_id: int, level: int, tokens: int, seconds: float) -> None:
        """A micro-step of ``tokens`` that did not run wholly at one level had ``seconds`` at
        ``level`` beside a busy decode (summed over stretches): the level trains at most
        ``tokens / seconds``. It counts as a sample: the first one sets
        the rate, later ones move it by alpha toward the bound when the bound is below it (a
        stretch the daemon overstated, a checkpoint say, costs a measured level only that)
        and leave it otherwise. Stretches under ``min_unfinished_s`` are ignored."""
        bound = self._checked(job_id, level, tokens, seconds)
        if seconds < self.min_unfinished_s:
            return
        n = self.samples[level]
        rate = self.rate_tok_s[level]
        self.rate_tok_s[level] = bound if n == 0 else rate + self.alpha * min(0.0, bound - rate)
        self.samples[level] = n + 1
        self.cap_tok_s[level] = min(self.cap_tok_s[level], bound)
        self._recompute()

    def bound_running(self, job_id: int, level: int, tokens: int, seconds: float) -> None:
        """A micro-step of ``tokens`` still in flight has had ``seconds`` at ``level`` beside a
        busy decode: the level trains under ``tokens / seconds`` so far. Only the level's cap
        moves (not its rate, and it is no sample): a trial ends once that is under a measured
        level's rate, ~0.5 s into a level at ~270 tok/s instead of the ~4 s its micro-step
        takes to report. Another job's bound, or a non-positive one, says nothing."""
        if job_id != self.job_id or not 1 <= level <= self.levels or tokens <= 0 \
                or not seconds > 0.0:
            return
        bound = tokens / seconds
        if bound < self.cap_tok_s[level]:
            self.cap_tok_s[level] = bound
            # Only a cap under a measured level's rate can change a choice (it leaves the level).
            if not self.left[level] and bound < self._fastest_measured():
                self._recompute()

    def _fastest_measured(self) -> float:
        """The highest rate of a level with ``min_samples`` or more (0: none)."""
        return max((self.rate_tok_s[lv] for lv in range(1, self.levels + 1)
                    if self.samples[lv] >= self.min_samples), default=0.0)

    def _checked(self, job_id: int, level: int, tokens: int, seconds: float) -> float:
        """tokens / seconds, after checking them; a new job starts the table over."""
        if not 1 <= level <= self.levels:
            raise ValueError(f"level must be in 1..{self.levels}, got {level}")
        if tokens < 0 or not (seconds > 0.0 and math.isfinite(seconds)):
            raise ValueError(f"need tokens >= 0 and finite seconds > 0, got {tokens} in "
                             f"{seconds}")
        if job_id != self.job_id:
            self.job_id = job_id
            self._reset()
        return tokens / seconds

    def best(self, upto: int, skipped: Sequence[int] = ()) -> int:
        """The level in 1..``upto``, outside ``skipped``, to run at while decode is busy
        (``upto`` itself when it is 0, or unmeasured and not bounded under a measured level;
        it is never in ``skipped``). O(1) when nothing is skipped, O(levels) otherwise."""
        if not 0 <= upto <= self.levels:
            return upto
        return self._choose(upto, skipped) if skipped else self._best[upto]

    def _choose(self, upto: int, skipped: Sequence[int] = ()) -> int:
        samples, rate, min_samples = self.samples, self.rate_tok_s, self.min_samples
        # The allowed level itself (plain harli's choice) until it is measured, then each
        # lower one in turn, from the top: lower levels are within the SLO whenever upto is,
        # and a level that never finishes a micro-step beside a busy decode gets measured
        # anyway (observe_unfinished). A level whose bound is already under a measured
        # level's rate is left (_recompute) after that one bound, not tried until
        # min_samples: at ~270 tok/s a bound comes every ~4 s, so a level tried until
        # min_samples could hold a whole 12-s turn at 268 tok/s beside a measured 1700.
        # A level dominated by an allowed one (dominated_by) is neither tried nor chosen.
        excluded = [level in skipped or self._covered(level, upto, skipped)
                    for level in range(upto + 1)]
        for level in self._trial_order:  # the levels that spill onto decode's cores last
            if level <= upto and not excluded[level] and samples[level] < min_samples \
                    and not self.left[level]:
                return level
        # Every allowed level is measured or left: the fastest measured one (upto on a tie,
        # then the lowest); upto itself if none is measured (every one was left for a level
        # the rules do not allow now).
        top = 0
        for level in (upto, *range(1, upto)):
            if (not excluded[level] and samples[level] >= min_samples
                    and (top == 0 or rate[level] > rate[top])):
                top = level
        return top or upto

    def _covered(self, level: int, upto: int, skipped: Sequence[int]) -> bool:
        """Whether a level dominating ``level`` (through the chain) is allowed: within
        ``upto`` and not in ``skipped``."""
        m = self.dominated_by[level]
        while m is not None and m <= upto:
            if m not in skipped:
                return True
            m = self.dominated_by[m]
        return False

    def _recompute(self) -> None:
        # Leave each unmeasured level capped under a measured one (a new cap or a new rate):
        # its own cap, or what the level dominating it trains (measured) or is capped at.
        floor = self._fastest_measured()
        for level in range(1, self.levels + 1):
            if self.samples[level] < self.min_samples and self._upper(level) < floor:
                self.left[level] = True
        self._best = [0, *(self._choose(upto) for upto in range(1, self.levels + 1))]

    def _upper(self, level: int) -> float:
        """The most ``level`` can train: its cap, and its dominating level's rate once
        measured, else that level's own upper bound (inf: unknown)."""
        upper = self.cap_tok_s[level]
        m = self.dominated_by[level]
        if m is not None:
            upper = min(upper, self.rate_tok_s[m] if self.samples[m] >= self.min_samples
                        else self._upper(m))
        return upper

    def snapshot(self) -> dict[int, float]:
        """Measured rates (tokens/s) by level, of levels with ``min_samples`` or more."""
        return {lv: self.rate_tok_s[lv] for lv in range(1, self.levels + 1)
                if self.samples[lv] >= self.min_samples}
