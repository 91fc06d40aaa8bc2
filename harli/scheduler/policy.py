"""Quota policies: before each decode iteration, pick the finetune's quota level 0..K.

``HarliPolicy`` asks the latency predictor for each level's upper bound on the next
iteration's latency and takes the highest level inside the TPOT SLO, both by its own bound and
by the non-decreasing (isotonic) fit of all the levels' bounds, which no noisy level escapes by
coming out under a lower one. It goes down at once (never a level whose predicted bound is over
the SLO) and up only after the higher level has been feasible for ``hysteresis_iters``
decisions in a row, so a load that oscillates around a level boundary does not make the
finetune flap. The bound stands for a quantile of
the iteration's latency: with an ``ErrorBudget`` (the ``harli`` spelling) the one the tokens
measured against the SLO so far allow, else (``harli:strict``) the attainment target on every
decision. With ``LevelRates`` it runs, while decode is busy, at the level up to that one which
has trained fastest (on CPU a level that spills onto decode's core trains slower than the one
below it). When even decode alone is over the SLO it pauses, or, with ``infeasible_slowdown``,
keeps the levels the fits say cost decode next to nothing. ``StaticPolicy``, ``NaivePolicy``
(always K) and ``DecodeOnlyPolicy`` (always 0) are baselines; ``parse_policy`` reads the
config and CLI spelling of each.

Pure logic: no torch, no ZMQ, no clock (``now`` is passed in). ``HarliPolicy.decide`` runs
before every decode iteration and costs one ``upper_bounds`` call (every level's bound in one
pass).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from harli.predictor import BatchShape, Prediction
from harli.scheduler.budget import ErrorBudget
from harli.scheduler.rates import LevelRates
from harli.scheduler.slo import SloTarget

__all__ = [
    "POLICY_FORMS",
    "BatchView",
    "DecodeOnlyPolicy",
    "HarliPolicy",
    "LatencyPredictor",
    "NaivePolicy",
    "Policy",
    "PolicyDecision",
    "StaticPolicy",
    "parse_policy",
]

POLICY_FORMS = ("'harli', 'harli:strict', 'harli:max', 'static:L' (L in 0..levels), 'naive' "
                "or 'decode-only'")

# Reasons HarliPolicy gives; the ones with numbers start with these words.
REASON_IDLE = "idle: nothing running or waiting"
REASON_STEADY = "steady"  # the current level is the highest feasible one
REASON_DOWN = "down"  # the current level's bound is over the SLO: dropped at once
REASON_UP = "up"  # a higher level has been feasible for hysteresis_iters decisions
REASON_HOLD = "hold"  # a higher level is feasible, not yet for long enough
REASON_INFEASIBLE = "infeasible"  # even level 0's bound is over the SLO: see HarliPolicy
REASON_PROBE = "probe"  # a level above the allowed one, not yet measured: see HarliPolicy
# A probe: this many decisions at the level (the predictor learns a level's own slowdown from
# 20 iterations at it, and the first one or two after a switch may still run at the old
# level), at most once every PROBE_EVERY decisions.
PROBE_ITERS = 24
PROBE_EVERY = 400
# Appended when LevelRates picked a lower level than the feasible one it was allowed.
REASON_RATE = "; level {level} of {allowed}: it trains faster while decode runs"
_REASON_WORD = re.compile(r"[:; ]")


class LatencyPredictor(Protocol):
    """What the policy needs of ``harli.predictor.LatencyModel``."""

    def predict(self, shape: BatchShape, level: int,
                quantile: float | None = None) -> Prediction:
        """``upper_s`` at ``quantile`` of the latency (None: the model's configured one)."""
        ...

    def upper_bounds(self, shape: BatchShape, top_level: int,
                     quantile: float | None = None) -> list[float]:
        """``predict(shape, level, quantile).upper_s`` of each level 0..``top_level``."""
        ...

    def slowdown(self, shape: BatchShape, level: int) -> float:
        """How many times slower the fits say this iteration runs at ``level`` than alone."""
        ...

    def measured(self, level: int) -> bool:
        """Whether ``level``'s prediction stands on a stage of its own (a profile's fit or
        what it learnt online), not on a conservative fallback from the level below."""
        ...


@dataclass(frozen=True, slots=True)
class BatchView:
    """What the daemon knows before the next decode iteration: the batch it will run
    (mapped onto ``BatchShape`` by ``shape()``) and how many requests wait behind it."""

    num_running: int  # requests in the next iteration's batch
    num_waiting: int  # requests queued, not yet scheduled
    decode_tokens: int
    prefill_tokens: int
    context_tokens: int  # tokens already in the KV cache of the scheduled requests
    prefill_attn_tokens: int = 0  # see BatchShape.prefill_attn_tokens
    lora_requests: int = 0  # of the batch, served with an adapter

    def __post_init__(self) -> None:
        if min(self.num_running, self.num_waiting, self.decode_tokens, self.prefill_tokens,
               self.context_tokens, self.prefill_attn_tokens, self.lora_requests) < 0:
            raise ValueError(f"batch view counts must be >= 0, got {self}")

    @property
    def idle(self) -> bool:
        return self.num_running == 0 and self.num_waiting == 0

    def shape(self) -> BatchShape:
        return BatchShape(self.num_running, self.decode_tokens, self.prefill_tokens,
                          self.context_tokens, self.prefill_attn_tokens, self.lora_requests)


class PolicyDecision(NamedTuple):
    """A NamedTuple, like ``Prediction``: one is built before every decode iteration, and a
    tuple is the cheapest immutable record in CPython (a frozen dataclass's ``__init__``
    goes through ``object.__setattr__`` once a field)."""

    level: int  # finetune quota level for the next iteration, 0 = finetune paused
    reason: str  # why; starts with one of the REASON_* words
    predicted_upper_s: float | None  # predictor's upper bound at ``level`` (before margin)
    quantile: float | None = None  # the quantile that bound stands for (None: the model's)

    @property
    def kind(self) -> str:
        """The reason's first word ("steady", "infeasible", "static", ...): what the daemon
        counts decisions by."""
        return _REASON_WORD.split(self.reason, maxsplit=1)[0]


class Policy(Protocol):
    def decide(self, view: BatchView, now: float) -> PolicyDecision: ...

    def on_tokens(self, tokens: int, missed: int) -> None:
        """``tokens`` inter-token gaps were measured, ``missed`` of them over the SLO."""
        ...


def pooled_bounds(uppers_s: Sequence[float]) -> Sequence[float]:
    """The non-decreasing sequence closest to ``uppers_s`` in least squares (isotonic
    regression, pool-adjacent-violators, equal weights): each run of levels whose bounds come
    out of order gets their mean. Bounds already in order come back as they are (the same
    object: the common case, and the decision's hot path)."""
    prev = -math.inf
    for u in uppers_s:  # a plain loop: a generator costs the hot path more than the check
        if u < prev:
            break
        prev = u
    else:
        return uppers_s
    blocks: list[list[float]] = []  # [sum, count] of each pooled run, in level order
    for u in uppers_s:
        blocks.append([u, 1.0])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def running_max(uppers_s: Sequence[float]) -> Sequence[float]:
    """Each level's bound raised to the largest of the levels below it: the envelope of the
    ``harli:max`` spelling, under which a level is allowed only with every level below it."""
    return list(itertools.accumulate(uppers_s, max))


# How HarliPolicy makes the per-level bounds non-decreasing before it compares them with the
# SLO: by their isotonic fit (the default) or by their running max (``harli:max``).
ENVELOPES = {"isotonic": pooled_bounds, "max": running_max}


def _check_levels(levels: int) -> None:
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")


class HarliPolicy:
    """SLO-aware quota: the highest level whose predicted upper bound, times ``margin``, is
    within the TPOT SLO, and so is the isotonic fit of every level's bound at it
    (``pooled_bounds``), with hysteresis on the way up. A level whose own bound is over is
    skipped (never chosen, held or picked by rate), but lets a higher one through when the
    pooled fit does: one noisy fit a little over the SLO does not gate the levels above it.
    ``envelope="max"`` (the ``harli:max`` spelling) uses the running max of the bounds
    instead: a level is allowed only with every level below it, the rule before the isotonic
    fit, kept to compare the two side by side in ``harli bench``.

    Hysteresis: the policy keeps the highest feasible level ("target") of each of the last
    ``hysteresis_iters`` decisions. It moves up only to the lowest of those targets, i.e. to a
    level that has been feasible in every one of them; it moves down to the target at once.
    An idle engine (nothing running, nothing waiting) gets level K at once. The policy starts
    as if the engine had been idle (at K), so the first busy decision takes the target.

    ``budget``: the bound stands for ``budget.quantile()`` (fed by ``on_tokens``) instead of the
    model's configured quantile, so the policy spends the misses the attainment target leaves
    while the measured tokens are ahead of it and tightens when they fall behind.

    ``rates``: while decode is busy the level emitted is ``rates.best(level)``, the fastest
    measured level up to the one the rules above allow (the hysteresis state stays the allowed
    one, so a rate choice does not count as a step down).

    Probes: a level without a stage of its own is predicted from the level below it times a
    conservative factor, which at a tight SLO keeps it out of reach, and so it is never run and
    never learnt (a fresh daemon with no profile would hold level 1 for ever). With a budget
    that has misses to spare (``ErrorBudget.spare``), the policy runs the unmeasured level just
    above the allowed one for ``PROBE_ITERS`` decisions, at most once every ``PROBE_EVERY``,
    unless its rate is known to be under a measured level's; the probe ends at once when the
    budget stops having misses to spare. What it costs is paid from that surplus.

    ``infeasible_slowdown``: when even level 0's bound is over the SLO, a pause cannot bring
    this iteration inside it, only shave what the finetune adds. The target is then the
    highest level whose fitted slowdown of decode (``LatencyPredictor.slowdown``, stage 2 over
    stage 1, without the online bias), and every lower level's, is at most this factor; 1.0
    pauses, and so does a ``budget`` that is behind its target (``ErrorBudget.behind``): a
    small slowdown is a cost paid in misses, spent only while the tokens have misses to
    spare. Bounds are not compared across levels here: one level's noisy tail below level 0's
    is no evidence that the finetune costs decode nothing.
    """

    def __init__(self, model: LatencyPredictor, levels: int, slo: SloTarget,
                 hysteresis_iters: int = 8, margin: float = 1.0,
                 budget: ErrorBudget | None = None, rates: LevelRates | None = None,
                 infeasible_slowdown: float = 1.0, envelope: str = "isotonic") -> None:
        _check_levels(levels)
        if hysteresis_iters < 1:
            raise ValueError(f"hysteresis_iters must be >= 1 (1 = none), got {hysteresis_iters}")
        if not (margin > 0.0 and math.isfinite(margin)):
            raise ValueError(f"margin must be finite and > 0, got {margin}")
        if not 1.0 <= infeasible_slowdown < math.inf:
            raise ValueError(f"infeasible_slowdown must be finite and >= 1 (1 = pause), got "
                             f"{infeasible_slowdown}")
        if envelope not in ENVELOPES:
            raise ValueError(f"envelope must be one of {sorted(ENVELOPES)}, got {envelope!r}")
        self._envelope = ENVELOPES[envelope]
        self._infeasible_slowdown = infeasible_slowdown
        self._model = model
        self._levels = levels
        self._slo = slo
        self._tpot_s = slo.tpot_s
        self._margin = margin
        self._hysteresis_iters = hysteresis_iters
        # The last hysteresis_iters decisions' targets, each with whether it was an infeasible
        # load's (see _settle).
        self._targets: deque[tuple[int, bool]] = deque(maxlen=hysteresis_iters)
        self._level = levels
        self._budget = budget
        self._rates = rates
        self._decisions = 0
        self._probe_level = 0
        self._probe_left = 0  # decisions of the probe in flight still to run
        self._probe_at = -PROBE_EVERY  # the decision at which the last probe began

    @property
    def level(self) -> int:
        """The level of the last decision (K before the first)."""
        return self._level

    @property
    def levels(self) -> int:
        return self._levels

    @property
    def slo(self) -> SloTarget:
        return self._slo

    @property
    def budget(self) -> ErrorBudget | None:
        return self._budget

    def on_tokens(self, tokens: int, missed: int) -> None:
        if self._budget is not None:
            self._budget.on_tokens(tokens, missed)

    def decide(self, view: BatchView, now: float) -> PolicyDecision:
        del now  # the policy counts decisions, not seconds
        if view.num_running == 0 and view.num_waiting == 0:
            self._targets.append((self._levels, False))
            self._level = self._levels
            return PolicyDecision(self._levels, REASON_IDLE, None)

        shape = view.shape()
        quantile = self._budget.quantile() if self._budget is not None else None
        limit_s, margin = self._tpot_s, self._margin
        # Every level's bound in one call: this runs before every decode iteration.
        uppers_s = self._model.upper_bounds(shape, self._levels, quantile)
        if uppers_s[0] * margin > limit_s:  # a load decode alone cannot serve
            return self._decide_infeasible(shape, uppers_s, quantile)
        # More quota cannot make decode faster, but per-level fits and their online
        # corrections are noisy, so the bounds seldom come out in order. A level is allowed
        # when its own bound is within the SLO and so is the non-decreasing fit of all the
        # bounds (isotonic: pooled_bounds) at it: a lower level's bound far over the SLO still
        # holds every level above it back, but one a little over it (seen in a CPU profile:
        # level 1's fit 2-10 % over level 0's, with levels 2-4 as cheap as level 0) no longer
        # does.
        # Level 0 is allowed here: the isotonic fit at the first level is at most its bound.
        pooled_s = self._envelope(uppers_s)
        skipped: list[int] = []
        target = 0
        for level, (upper_s, pooled) in enumerate(zip(uppers_s, pooled_s, strict=True)):
            if upper_s * margin > limit_s:
                skipped.append(level)
            elif pooled * margin <= limit_s:
                target = level
        chosen, reason = self._settle(target, skipped)
        probe = self._probe(chosen)
        if probe:
            return PolicyDecision(probe, f"{REASON_PROBE}: level {probe} has no measured "
                                  f"slowdown yet; the error budget has misses to spare",
                                  uppers_s[probe], quantile)
        level = self._by_rate(chosen, skipped)
        if level != chosen:  # best() stays within 1..chosen, outside skipped: allowed too
            reason += REASON_RATE.format(level=level, allowed=chosen)
        return PolicyDecision(level, reason, uppers_s[level], quantile)

    def _probe(self, allowed: int) -> int:
        """The level to probe at in this decision (0: none); see the class docstring."""
        self._decisions += 1
        budget = self._budget
        if budget is None or not budget.spare:
            self._probe_left = 0
            return 0
        if self._probe_left > 0:
            self._probe_left -= 1
            return self._probe_level
        level = allowed + 1
        if (level > self._levels or self._decisions - self._probe_at < PROBE_EVERY
                or self._model.measured(level)
                or (self._rates is not None and self._rates.left[level])):
            return 0
        self._probe_level, self._probe_left, self._probe_at = level, PROBE_ITERS - 1, \
            self._decisions
        return level

    def _settle(self, target: int, skipped: Sequence[int] = (),
                infeasible: bool = False) -> tuple[int, str]:
        """Record ``target`` (this decision's highest allowed level) and return the level to
        hold and the reason word: down at once, up only as far as every one of the last
        ``hysteresis_iters`` targets allows. Every level up to a target is allowed but those
        in ``skipped`` (their own bound is over the SLO now): a held level among them drops
        to the highest allowed one below it.

        A feasible decision's rise looks past the targets of infeasible loads among them: the
        hysteresis keeps a load near a level's boundary from flapping that level, and a pause
        for a burst that even decode alone could not serve says nothing about where the
        boundary is (measured: 35-60 ``hold`` decisions at level 0 after each such burst,
        a third of a 2-s bench block, while the static level beside it missed nothing)."""
        targets = self._targets
        targets.append((target, infeasible))
        current = self._level
        if target <= current:
            chosen = target
            reason = REASON_STEADY if target == current else REASON_DOWN
        else:
            counted = [t for t, inf in targets if infeasible or not inf]
            settled = min(counted) if len(targets) == self._hysteresis_iters else current
            chosen = max(current, settled)
            reason = REASON_UP if chosen > current else REASON_HOLD
        while chosen in skipped:  # level 0 never is: its bound is within the SLO here
            chosen -= 1
            reason = REASON_DOWN
        self._level = chosen
        return chosen, reason

    def _by_rate(self, allowed: int, skipped: Sequence[int] = ()) -> int:
        """The level to run while decode is busy, ``allowed`` the highest one the rules allow:
        the fastest measured one up to it outside ``skipped`` (``LevelRates.best``), or itself
        without rates."""
        return allowed if self._rates is None else self._rates.best(allowed, skipped)

    def _decide_infeasible(self, shape: BatchShape, uppers_s: Sequence[float],
                           quantile: float | None) -> PolicyDecision:
        """Level 0's bound ``uppers_s[0]`` is over the SLO: the highest level the fits say
        slows decode by at most ``infeasible_slowdown`` (0 when none does), down at once, up
        after the hysteresis as for a feasible one."""
        upper0_s = uppers_s[0]
        cheap = 0
        # A slowdown within the factor still pushes some tokens over an SLO this close to
        # decode's own latency; it is spent only from a budget with misses to spare (at an
        # SLO of 1.5x decode's median, training on under this rule unconditionally missed
        # more than the static levels did).
        spent = self._budget is not None and self._budget.behind
        if self._infeasible_slowdown > 1.0 and not spent:
            slowdown = self._model.slowdown
            for level in range(1, self._levels + 1):
                if slowdown(shape, level) > self._infeasible_slowdown:
                    break
                cheap = level
        chosen, _ = self._settle(cheap, infeasible=True)
        reason = (f"{REASON_INFEASIBLE}: level 0 bound {1000.0 * upper0_s * self._margin:.2f} "
                  f"ms (margin {self._margin:g}) > SLO {self._slo.tpot_ms:g} ms; ")
        if chosen == 0:
            why = ("decode only: the error budget is spent" if spent and
                    self._infeasible_slowdown > 1.0 else "decode only")
            return PolicyDecision(0, reason + why, upper0_s, quantile)
        level = self._by_rate(chosen)
        reason += (f"level {level}: the fits say it slows decode by at most "
                   f"{self._infeasible_slowdown:g}x, which a pause would not buy back")
        return PolicyDecision(level, reason, uppers_s[level], quantile)


class StaticPolicy:
    """Always the same level (a baseline, or the pre-scheduler behaviour)."""

    def __init__(self, level: int) -> None:
        if level < 0:
            raise ValueError(f"static level must be >= 0, got {level}")
        self._decision = PolicyDecision(level, f"static: level {level}", None)

    def decide(self, view: BatchView, now: float) -> PolicyDecision:
        return self._decision

    def on_tokens(self, tokens: int, missed: int) -> None:
        pass


class NaivePolicy:
    """Always level K: the finetune runs flat out beside decode, SLO or not."""

    def __init__(self, levels: int) -> None:
        _check_levels(levels)
        self._decision = PolicyDecision(levels, f"naive: always level {levels}", None)

    def decide(self, view: BatchView, now: float) -> PolicyDecision:
        return self._decision

    def on_tokens(self, tokens: int, missed: int) -> None:
        pass


class DecodeOnlyPolicy:
    """Always level 0: the finetune never runs beside decode."""

    _DECISION = PolicyDecision(0, "decode-only: always level 0", None)

    def decide(self, view: BatchView, now: float) -> PolicyDecision:
        return self._DECISION

    def on_tokens(self, tokens: int, missed: int) -> None:
        pass


def check_policy(spec: str, levels: int) -> tuple[str, int | None]:
    """Validate a config or CLI policy string: 'harli', 'harli:strict', 'harli:max',
    'static:L', 'naive' or 'decode-only' (case and surrounding spaces ignored). Returns (kind,
    L for static); ValueError names the accepted forms or the level range."""
    _check_levels(levels)
    text = spec.strip().lower()
    if text in ("harli", "harli:strict", "harli:max", "naive", "decode-only"):
        return text, None
    kind, sep, arg = text.partition(":")
    if kind == "static" and sep:
        # ASCII digits only: int() also reads other scripts' digits ("١"), which would then
        # be echoed back as the policy's name.
        if not (arg.isascii() and arg.strip().isdigit()):
            raise ValueError(f"policy {spec!r}: the level in 'static:L' must be an integer in "
                             f"0..{levels}; accepted forms: {POLICY_FORMS}")
        level = int(arg)
        if not 0 <= level <= levels:
            raise ValueError(f"policy {spec!r}: static level must be in 0..{levels} "
                             f"(finetune.levels), got {level}")
        return kind, level
    raise ValueError(f"unknown policy {spec!r}; accepted forms: {POLICY_FORMS}")


def parse_policy(spec: str, model: LatencyPredictor, levels: int, slo: SloTarget, *,
                 budget_tokens: int = 1000, budget_max_factor: float = 10.0,
                 rates: LevelRates | None = None,
                 infeasible_slowdown: float = 1.0,
                 budget: ErrorBudget | None = None) -> Policy:
    """The policy named by ``spec`` (see ``check_policy``); ``harli`` and ``harli:max`` get
    ``budget`` (one kept by the caller across policy switches) or a fresh
    ``ErrorBudget(slo.attainment, budget_tokens, budget_max_factor)``; every harli form gets
    ``rates`` (the daemon's, shared across policy switches) and ``infeasible_slowdown``."""
    kind, level = check_policy(spec, levels)
    if kind in ("harli", "harli:max"):
        if budget is None or budget.attainment != slo.attainment:
            budget = ErrorBudget(slo.attainment, budget_tokens, budget_max_factor)
        return HarliPolicy(model, levels, slo, rates=rates, budget=budget,
                           infeasible_slowdown=infeasible_slowdown,
                           envelope="max" if kind == "harli:max" else "isotonic")
    if kind == "harli:strict":
        return HarliPolicy(model, levels, slo, rates=rates,
                           infeasible_slowdown=infeasible_slowdown)
    if kind == "naive":
        return NaivePolicy(levels)
    if kind == "decode-only":
        return DecodeOnlyPolicy()
    assert level is not None
    return StaticPolicy(level)
