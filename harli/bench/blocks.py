"""The bench's switchback design, as pure bookkeeping: policies take turns in short blocks over
one continuous workload, and every figure is pooled over a policy's blocks and given a 95 %
interval from a block bootstrap that resamples whole cycles.

A *cycle* is one block of every policy, in an order shuffled by the seed, so slow drifts of the
host fall on every policy alike; the workload keeps one load phase through a cycle (the phases
take turns cycle by cycle), so within a cycle every policy faces the same load. Tokens are
attributed to the block in which they were emitted, and only after a settling margin from the
switch (counted by the caller: a block's window starts after it); a micro-step's trained tokens
are split between blocks by the time it ran in each.

No torch, no sockets: everything here is unit tested on synthetic blocks.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

DECODE_ONLY = "decode-only"


@dataclass(frozen=True)
class Block:
    """One policy's counted window in one cycle."""

    policy: str
    cycle: int
    phase: str  # the workload's load phase at the window's middle
    start_s: float  # the counted window, seconds on the caller's clock
    end_s: float
    tokens: int = 0  # inter-token gaps that ended in the window
    tokens_ok: int = 0  # of those, gaps within the SLO
    trained_tokens: float = 0.0  # a micro-step's tokens split by the time it ran in each

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its 95 % bootstrap interval; ``None`` where undefined."""

    value: float | None
    lo: float | None = None
    hi: float | None = None

    def meets(self, target: float) -> bool:
        """The whole interval is at or above ``target``."""
        return self.lo is not None and self.lo >= target

    def may_meet(self, target: float) -> bool:
        """The interval reaches ``target``: the data cannot rule it out."""
        return self.hi is not None and self.hi >= target


def shuffled_cycles(policies: Sequence[str], cycles: int, seed: int) -> list[list[str]]:
    """Each cycle's order of the policies: a fresh shuffle per cycle, from the seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(cycles):
        order = list(policies)
        rng.shuffle(order)
        out.append(order)
    return out


def level_of(policy: str) -> int | None:
    """The fixed quota level of ``static:L`` (``decode-only``: 0); None for adaptive ones."""
    if policy == DECODE_ONLY:
        return 0
    if policy.startswith("static:"):
        try:
            return int(policy.split(":", 1)[1])
        except ValueError:
            return None
    return None


def count_gaps(token_times: Iterable[Sequence[float]], windows: Sequence[tuple[float, float]],
               slo_s: float) -> list[tuple[int, int]]:
    """(gaps, gaps within ``slo_s``) per window, for every request's token times: a gap
    belongs to the window holding its second token. ``windows`` are disjoint, in time order."""
    starts = [w[0] for w in windows]
    counts = [[0, 0] for _ in windows]
    for times in token_times:
        for a, b in itertools.pairwise(times):
            i = bisect.bisect_right(starts, b) - 1
            if i < 0 or b >= windows[i][1]:
                continue  # in a settling margin, or outside the run
            counts[i][0] += 1
            counts[i][1] += (b - a) <= slo_s
    return [(n, ok) for n, ok in counts]


def trained_in_windows(samples: Sequence[tuple[float, int, int]],
                       windows: Sequence[tuple[float, float]]) -> list[float]:
    """Trained tokens per window from samples of (time, the job's token count, level in
    force). The count rises only when a micro-step ends, so the tokens of a rise are spread
    evenly over the time since the previous rise during which the level was above 0 (when
    the micro-step ran): a window gets the share of each micro-step that ran inside it, not
    whole micro-steps by where they happened to end."""
    out = [0.0] * len(windows)
    since = 0  # the sample at which the previous rise was seen
    for i in range(1, len(samples)):
        rise = samples[i][1] - samples[i - 1][1]
        if rise <= 0:
            continue
        spans = [(samples[j][0], samples[j + 1][0]) for j in range(since, i)
                 if samples[j][2] > 0] or [(samples[i - 1][0], samples[i][0])]
        ran_s = sum(b - a for a, b in spans)
        since = i
        for a, b in spans:
            share = rise * ((b - a) / ran_s if ran_s > 0 else 1.0 / len(spans))
            for k, (w0, w1) in enumerate(windows):
                overlap = min(b, w1) - max(a, w0)
                if overlap > 0:
                    out[k] += share * overlap / (b - a)
    return out


def attainment(blocks: Iterable[Block]) -> float | None:
    """Share of gaps within the SLO, pooled over ``blocks``."""
    n = ok = 0
    for b in blocks:
        n += b.tokens
        ok += b.tokens_ok
    return ok / n if n else None


def tok_s(blocks: Iterable[Block]) -> float | None:
    """Trained tokens per second, pooled over ``blocks``."""
    tokens = 0.0
    seconds = 0.0
    for b in blocks:
        tokens += b.trained_tokens
        seconds += b.duration_s
    return tokens / seconds if seconds > 0 else None


def phase_weights(phases: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Each load phase's share of the workload's time, from (name, duration) pairs."""
    total: dict[str, float] = {}
    for name, duration_s in phases:
        total[name] = total.get(name, 0.0) + duration_s
    whole = sum(total.values())
    return {name: d / whole for name, d in total.items()} if whole > 0 else {}


def _by(blocks: Iterable[Block], policy: str, phase: str | None = None) -> list[Block]:
    return [b for b in blocks if b.policy == policy and (phase is None or b.phase == phase)]


def stratified_tok_s(blocks: Sequence[Block], policy: str,
                     weights: dict[str, float]) -> float | None:
    """``policy``'s tok/s in each phase, weighted by the phase's share of the workload; None
    when it has no block in some phase."""
    total = 0.0
    for phase, w in weights.items():
        r = tok_s(_by(blocks, policy, phase))
        if r is None:
            return None
        total += w * r
    return total


def best_mix_tok_s(blocks: Sequence[Block], weights: dict[str, float],
                   target: float) -> float | None:
    """The best mix in hindsight: a fixed level per load phase (``decode-only`` is 0), the
    combination that trains most, each phase weighted by its share of time, among those whose
    tokens, all phases together, meet ``target``. Each phase brings the tokens per second the
    run measured there (over every policy's blocks), kept within the SLO at the share its
    level kept there; a level with no token in a phase missed none there. Running one level
    throughout is one such mix, so the best mix trains at least as much as the best static
    level; a phase whose every level missed the target may still be spent on the fastest one
    when the quieter phases leave the misses to spare. None when some phase has no
    fixed-level block, or no mix meets the target."""
    fixed = [p for p in dict.fromkeys(b.policy for b in blocks) if level_of(p) is not None]
    options: list[list[tuple[float, float, float]]] = []  # per phase: (w tok/s, ok, tokens)
    for phase, w in weights.items():
        here = [b for b in blocks if b.phase == phase]
        seconds = sum(b.duration_s for b in here)
        rate = sum(b.tokens for b in here) / seconds if seconds > 0 else 0.0
        opts = []
        for p in fixed:
            mine = _by(here, p)
            if not mine:
                continue
            share = attainment(mine)
            tokens = w * rate
            opts.append((w * (tok_s(mine) or 0.0),
                         tokens * (1.0 if share is None else share), tokens))
        if not opts:
            return None
        options.append(opts)
    best: float | None = None
    for mix in itertools.product(*options):
        trained = sum(m[0] for m in mix)
        if best is not None and trained <= best:
            continue
        tokens = sum(m[2] for m in mix)
        if tokens <= 0 or sum(m[1] for m in mix) >= target * tokens:
            best = trained
    return best


def _stratum(cycle: Sequence[Block]) -> str:
    """A cycle's load phase: the one most of its blocks ran in."""
    phases = [b.phase for b in cycle]
    return max(dict.fromkeys(phases), key=phases.count)


def bootstrap(blocks: Sequence[Block], stat: Callable[[Sequence[Block]], float | None],
              resamples: int = 2000, seed: int = 0) -> Estimate:
    """``stat`` on all blocks, with the 2.5 and 97.5 percentiles of ``stat`` over resamples of
    whole cycles drawn with replacement (a cycle's blocks stay together, so the drift they
    shared stays in the interval), within each load phase: a resample has as many cycles of
    each phase as the run had, so it moves with the policies, not with how much of each load
    it happened to draw. Resamples where ``stat`` is undefined are left out."""
    value = stat(blocks)
    cycles: dict[int, list[Block]] = {}
    for b in blocks:
        cycles.setdefault(b.cycle, []).append(b)
    strata: dict[str, list[list[Block]]] = {}
    for key in sorted(cycles):
        strata.setdefault(_stratum(cycles[key]), []).append(cycles[key])
    if value is None or len(cycles) < 2:
        return Estimate(value)
    rng = random.Random(seed)
    draws: list[float] = []
    for _ in range(resamples):
        sample = [b for group in strata.values() for _ in group
                  for b in group[rng.randrange(len(group))]]
        v = stat(sample)
        if v is not None and math.isfinite(v):
            draws.append(v)
    if len(draws) < resamples // 2:  # mostly undefined: no honest interval
        return Estimate(value)
    draws.sort()
    return Estimate(value, _quantile(draws, 0.025), _quantile(draws, 0.975))


def _quantile(xs: Sequence[float], q: float) -> float:
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class PolicyFigures:
    attainment: Estimate
    tok_s: Estimate
    blocks: int
    seconds: float


@dataclass(frozen=True)
class Verdict:
    """What the blocks say, every figure with its interval."""

    target: float
    policies: dict[str, PolicyFigures]
    # Of the static levels whose attainment interval meets the target, the one that trained
    # the most (on a small host the top level may train less than a middle one).
    best_static: str | None
    undecided: list[str]  # higher static levels whose interval straddles the target
    ratio: Estimate  # harli's tok/s over the best static level's
    best_mix_tok_s: Estimate
    fraction_of_best_mix: Estimate  # harli's phase-weighted tok/s over the best mix's


def verdict(blocks: Sequence[Block], weights: dict[str, float], target: float,
            adaptive: str = "harli", resamples: int = 2000, seed: int = 0) -> Verdict:
    """Every policy's attainment (pooled over its blocks) and tok/s (per load phase, weighted
    by ``weights``), the best static level, and ``adaptive``'s ratio to it and fraction of the
    best mix in hindsight, each with its interval."""
    policies = list(dict.fromkeys(b.policy for b in blocks))

    def of(policy: str, stat: Callable[[Iterable[Block]], float | None],
           ) -> Callable[[Sequence[Block]], float | None]:
        return lambda bs: stat(_by(bs, policy))

    def rate(policy: str) -> Callable[[Sequence[Block]], float | None]:
        # Weighted by each load phase's share of the workload (post-stratified): a resample
        # that drew more quiet cycles than the run had would otherwise move every rate with
        # the load, not with the policy.
        return lambda bs: stratified_tok_s(bs, policy, weights) if weights else \
            tok_s(_by(bs, policy))

    figures = {
        p: PolicyFigures(
            attainment=bootstrap(blocks, of(p, attainment), resamples, seed),
            tok_s=bootstrap(blocks, rate(p), resamples, seed),
            blocks=len(_by(blocks, p)), seconds=sum(b.duration_s for b in _by(blocks, p)))
        for p in policies}
    statics = sorted((p for p in policies if p.startswith("static:") and level_of(p)),
                     key=lambda p: level_of(p) or 0)
    met = [p for p in statics if figures[p].attainment.meets(target)]
    best = max(met, key=lambda p: figures[p].tok_s.value or 0.0) if met else None
    undecided = [p for p in statics if figures[p].attainment.may_meet(target)
                 and not figures[p].attainment.meets(target)
                 and (figures[p].tok_s.value or 0.0) > (figures[best].tok_s.value or 0.0
                                                        if best else 0.0)]

    def ratio(bs: Sequence[Block]) -> float | None:
        a, s = rate(adaptive)(bs), rate(best)(bs) if best else None
        return a / s if a is not None and s else None

    def mix(bs: Sequence[Block]) -> float | None:
        return best_mix_tok_s(bs, weights, target)

    def fraction(bs: Sequence[Block]) -> float | None:
        m, h = best_mix_tok_s(bs, weights, target), stratified_tok_s(bs, adaptive, weights)
        return h / m if h is not None and m else None

    has_adaptive = adaptive in figures
    return Verdict(
        target=target, policies=figures, best_static=best, undecided=undecided,
        ratio=bootstrap(blocks, ratio, resamples, seed) if has_adaptive and best
        else Estimate(None),
        best_mix_tok_s=bootstrap(blocks, mix, resamples, seed),
        fraction_of_best_mix=bootstrap(blocks, fraction, resamples, seed) if has_adaptive
        else Estimate(None))
