"""Quota policies and SLO counting: HarliPolicy never picks a level predicted over the SLO,
goes down at once and up with hysteresis, never gives a bigger batch a higher level; the
baselines, ``parse_policy``, ``SloCounter``; and what one decision asks of the predictor."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harli.predictor import FEATURE_NAMES, BatchShape, LatencyModel, LevelFit, Prediction, SoloFit
from harli.scheduler.budget import ErrorBudget
from harli.scheduler.policy import (
    REASON_DOWN,
    REASON_HOLD,
    REASON_IDLE,
    REASON_INFEASIBLE,
    REASON_RATE,
    REASON_STEADY,
    REASON_UP,
    BatchView,
    DecodeOnlyPolicy,
    HarliPolicy,
    NaivePolicy,
    PolicyDecision,
    StaticPolicy,
    parse_policy,
    pooled_bounds,
)
from harli.scheduler.slo import SloCounter, SloTarget

from .fake_predictors import BoundsFromPredict

K = 4
# Seconds: intercept, per seq, per decode token, per prefill token, per 1k context tokens,
# per 1M prefill attention token-pairs, per LoRA batch, per LoRA batch token (the order of
# FEATURE_NAMES).
SOLO_COEFS = (5e-3, 1e-4, 5e-5, 2e-5, 3e-4, 1e-3, 4e-3, 2e-4)


def make_model(coefs: Sequence[float] = SOLO_COEFS,
               scales: Sequence[float] = (1.15, 1.3, 1.45, 1.6),
               offsets_s: Sequence[float] = (5e-4, 1e-3, 1.5e-3, 2e-3),
               solo_ratio_q: float = 1.05, level_ratio_q: float = 1.1) -> LatencyModel:
    """A LatencyModel with known stage-1 and stage-2 fits for levels 1..len(scales)."""
    solo = SoloFit(tuple(coefs), FEATURE_NAMES, n=1, quantile=0.99, ratio_q=solo_ratio_q,
                   spread_log=0.0, floor_s=1e-4)
    levels = {lv: LevelFit(lv, scale, off, n=1, quantile=0.99, ratio_q=level_ratio_q,
                           spread_log=0.0, floor_s=1e-4)
              for lv, (scale, off) in enumerate(zip(scales, offsets_s, strict=True), start=1)}
    return LatencyModel(solo, levels)


def view(running: int, waiting: int = 0, ctx_per_seq: int = 512, prefill: int = 0) -> BatchView:
    return BatchView(num_running=running, num_waiting=waiting, decode_tokens=running,
                     prefill_tokens=prefill, context_tokens=running * ctx_per_seq,
                     prefill_attn_tokens=prefill * (prefill + 512))


def highest_feasible(model: LatencyModel, v: BatchView, slo: SloTarget, margin: float = 1.0,
                     levels: int = K) -> int | None:
    """The highest level within the SLO by its own bound and by the isotonic fit of all the
    bounds (None: not even level 0)."""
    uppers = [model.predict(v.shape(), level).upper_s * margin for level in range(levels + 1)]
    if uppers[0] > slo.tpot_s:
        return None
    return max(level for level in range(levels + 1)
               if uppers[level] <= slo.tpot_s and isotonic_at(uppers, level) <= slo.tpot_s)


SLO = SloTarget(tpot_ms=25.0)
MODEL = make_model()
LIGHT = view(8)  # every level feasible
MEDIUM = view(32)  # level 2 the highest feasible
HEAVY = view(64)  # not even level 0


def test_fixture_shapes_have_the_intended_targets() -> None:
    assert highest_feasible(MODEL, LIGHT, SLO) == K
    assert highest_feasible(MODEL, MEDIUM, SLO) == 2
    assert highest_feasible(MODEL, HEAVY, SLO) is None


# -- strategies -------------------------------------------------------------------------------

views = st.builds(
    BatchView,
    num_running=st.integers(0, 96),
    num_waiting=st.integers(0, 3),
    decode_tokens=st.integers(0, 96),
    prefill_tokens=st.integers(0, 2048),
    context_tokens=st.integers(0, 96 * 2048),
    prefill_attn_tokens=st.integers(0, 2048 * 4096),
)
slos = st.floats(4.0, 80.0).map(lambda ms: SloTarget(tpot_ms=ms))


@st.composite
def models(draw: st.DrawFn) -> LatencyModel:
    """Random fits whose bound grows with the batch (non-negative coefficients) and with the
    level (increasing scales and offsets)."""
    coefs = [draw(st.floats(1e-3, 1e-2))] + [draw(st.floats(0.0, 1e-3))
                                             for _ in range(len(FEATURE_NAMES) - 1)]
    steps = [draw(st.floats(0.0, 0.5)) for _ in range(K)]
    scales = [1.0 + sum(steps[: i + 1]) for i in range(K)]
    offsets = [sum(draw(st.floats(0.0, 2e-3)) for _ in range(i + 1)) for i in range(K)]
    return make_model(coefs, scales, offsets, solo_ratio_q=draw(st.floats(1.0, 1.2)),
                      level_ratio_q=draw(st.floats(1.2, 1.5)))


class TablePredictor(BoundsFromPredict):
    """A fake predictor: upper bound per level from a table, shape ignored (any order of
    levels, including bounds that fall as the level rises)."""

    def __init__(self, uppers_s: Sequence[float]) -> None:
        self.uppers_s = list(uppers_s)

    def predict(self, shape: BatchShape, level: int,
                quantile: float | None = None) -> Prediction:
        return Prediction(self.uppers_s[level] / 2, self.uppers_s[level])


def isotonic_at(values: Sequence[float], level: int) -> float:
    """The isotonic (non-decreasing least-squares) fit of ``values`` at ``level``, by the
    min-max formula: an oracle independent of the policy's pool-adjacent-violators."""
    return max(min(sum(values[i:j + 1]) / (j + 1 - i) for j in range(level, len(values)))
               for i in range(level + 1))


def check_safe(d: PolicyDecision, upper_at: list[float], margin: float, slo: SloTarget,
               slowdown_at: list[float] | None = None, max_slowdown: float = 1.0) -> None:
    """The decision's level, level 0, and the isotonic fit of all the bounds at the level are
    within the SLO; or level 0 is over it and the decision is 0, or (``max_slowdown`` > 1) a
    level whose slowdown, and every lower one's, is at most ``max_slowdown``."""
    if d.reason == REASON_IDLE:
        assert d.level == K
        return
    assert d.predicted_upper_s == upper_at[d.level]
    if d.reason.startswith(REASON_INFEASIBLE):
        assert upper_at[0] * margin > slo.tpot_s
        if max_slowdown == 1.0 or d.level == 0:
            assert d.level == 0 and "decode only" in d.reason
        else:
            assert slowdown_at is not None
            assert all(x <= max_slowdown for x in slowdown_at[1:d.level + 1])
    else:
        assert upper_at[d.level] * margin <= slo.tpot_s
        assert upper_at[0] * margin <= slo.tpot_s
        assert isotonic_at(upper_at, d.level) * margin <= slo.tpot_s * (1 + 1e-9)


# -- HarliPolicy: safety ----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(model=models(), slo=slos, margin=st.floats(1.0, 1.5), hysteresis=st.integers(1, 10),
       history=st.lists(views, min_size=1, max_size=40))
def test_harli_never_picks_a_level_predicted_over_the_slo(
        model: LatencyModel, slo: SloTarget, margin: float, hysteresis: int,
        history: list[BatchView]) -> None:
    policy = HarliPolicy(model, K, slo, hysteresis_iters=hysteresis, margin=margin)
    for t, v in enumerate(history):
        d = policy.decide(v, now=float(t))
        if v.idle:
            assert (d.level, d.reason) == (K, REASON_IDLE)
            continue
        upper_at = [model.predict(v.shape(), lv).upper_s for lv in range(K + 1)]
        check_safe(d, upper_at, margin, slo)
        # Never above the highest feasible level.
        top = highest_feasible(model, v, slo, margin)
        assert d.level <= (top if top is not None else 0)


@settings(max_examples=150, deadline=None)
@given(tables=st.lists(st.lists(st.floats(1e-3, 0.1), min_size=K + 1, max_size=K + 1),
                       min_size=1, max_size=40),
       hysteresis=st.integers(1, 10))
def test_harli_is_safe_even_when_the_bound_is_not_monotonic_in_level(
        tables: list[list[float]], hysteresis: int) -> None:
    slo = SloTarget(tpot_ms=50.0)
    fake = TablePredictor(tables[0])
    policy = HarliPolicy(fake, K, slo, hysteresis_iters=hysteresis)
    for t, uppers in enumerate(tables):
        fake.uppers_s = uppers
        check_safe(policy.decide(view(4), float(t)), uppers, 1.0, slo)


@settings(max_examples=100, deadline=None)
@given(model=models(), slo=slos, history=st.lists(views, max_size=30))
def test_without_hysteresis_harli_takes_the_highest_feasible_level(
        model: LatencyModel, slo: SloTarget, history: list[BatchView]) -> None:
    policy = HarliPolicy(model, K, slo, hysteresis_iters=1)
    for t, v in enumerate(history):
        top = highest_feasible(model, v, slo)
        expected = K if v.idle else (top if top is not None else 0)
        assert policy.decide(v, float(t)).level == expected


def test_infeasible_load_runs_decode_only_and_says_so() -> None:
    d = HarliPolicy(MODEL, K, SLO).decide(HEAVY, 0.0)
    assert d.level == 0
    assert d.reason.startswith(REASON_INFEASIBLE)
    assert "decode only" in d.reason
    assert "25 ms" in d.reason
    assert d.predicted_upper_s == MODEL.predict(HEAVY.shape(), 0).upper_s


# -- HarliPolicy: loads even decode alone is predicted to miss --------------------------------


def slowdowns(model: LatencyModel, v: BatchView) -> list[float]:
    return [model.slowdown(v.shape(), lv) for lv in range(K + 1)]


def test_an_infeasible_load_keeps_the_levels_the_fits_say_cost_decode_little() -> None:
    sl = slowdowns(MODEL, HEAVY)
    assert 1.0 < sl[1] < sl[2]  # the fixture: level 1 slows the heavy batch least
    between = (sl[1] + sl[2]) / 2
    d = HarliPolicy(MODEL, K, SLO, infeasible_slowdown=between).decide(HEAVY, 0.0)
    assert d.level == 1 and d.reason.startswith(REASON_INFEASIBLE)
    assert "level 1" in d.reason and "25 ms" in d.reason
    assert d.predicted_upper_s == MODEL.predict(HEAVY.shape(), 1).upper_s
    # A limit under level 1's slowdown pauses, as the default (1.0) does.
    for limit in (1.0, sl[1] * 0.99):
        d = HarliPolicy(MODEL, K, SLO, infeasible_slowdown=limit).decide(HEAVY, 0.0)
        assert d.level == 0 and "decode only" in d.reason


def test_an_infeasible_load_pauses_once_the_error_budget_is_spent() -> None:
    sl = slowdowns(MODEL, HEAVY)
    between = (sl[1] + sl[2]) / 2
    budget = ErrorBudget(SLO.attainment, 1000, 10.0)
    policy = HarliPolicy(MODEL, K, SLO, budget=budget, infeasible_slowdown=between)
    assert policy.decide(HEAVY, 0.0).level == 1  # on target: the cheap level is kept
    policy.on_tokens(100, 5)  # 5 % of these tokens missed: the window is over its 1 %
    assert budget.behind
    d = policy.decide(HEAVY, 1.0)
    assert d.level == 0 and d.reason.startswith(REASON_INFEASIBLE)
    assert "error budget is spent" in d.reason
    for _ in range(30):  # clean tokens pay it back, and the cheap level returns (hysteresis)
        policy.on_tokens(100, 0)
    assert not budget.behind
    assert [policy.decide(HEAVY, 2.0 + t).level for t in range(8)][-1] == 1


def test_an_infeasible_load_rises_only_through_the_hysteresis() -> None:
    sl = slowdowns(MODEL, HEAVY)
    policy = HarliPolicy(MODEL, K, SLO, hysteresis_iters=3, infeasible_slowdown=sl[K])
    assert policy.decide(HEAVY, 0.0).level == K  # from K (the start) down to what is allowed
    assert policy.decide(MEDIUM, 1.0).level == 2  # feasible up to 2: down at once
    assert [policy.decide(HEAVY, float(t)).level for t in (2, 3, 4)] == [2, 2, K]


@settings(max_examples=150, deadline=None)
@given(model=models(), slo=slos, margin=st.floats(1.0, 1.5), hysteresis=st.integers(1, 10),
       limit=st.floats(1.0, 1.6), history=st.lists(views, min_size=1, max_size=40))
def test_an_infeasible_load_never_gets_a_level_slower_than_allowed(
        model: LatencyModel, slo: SloTarget, margin: float, hysteresis: int, limit: float,
        history: list[BatchView]) -> None:
    policy = HarliPolicy(model, K, slo, hysteresis_iters=hysteresis, margin=margin,
                         infeasible_slowdown=limit)
    for t, v in enumerate(history):
        d = policy.decide(v, now=float(t))
        if v.idle:
            continue
        upper_at = [model.predict(v.shape(), lv).upper_s for lv in range(K + 1)]
        check_safe(d, upper_at, margin, slo, slowdowns(model, v), limit)


def test_slowdown_is_the_fits_not_the_online_bias() -> None:
    model = make_model()
    shape = HEAVY.shape()
    before = [model.slowdown(shape, lv) for lv in range(K + 1)]
    assert before[0] == 1.0 and before == sorted(before)
    fitted_s = model.predict(shape, 2).estimate_s
    for t in range(200):  # level 2 measured 3x its fit: its bias moves, its slowdown not
        model.observe(shape, 2, 3 * fitted_s, float(t))
    assert model.predict(shape, 2).estimate_s > 2 * fitted_s
    assert [model.slowdown(shape, lv) for lv in range(K + 1)] == before
    online = LatencyModel.online(prior_latency_s=0.05)  # no stage 1 yet: nothing is cheap
    assert online.slowdown(shape, 0) == 1.0 and online.slowdown(shape, 1) == math.inf


def test_margin_scales_the_bound() -> None:
    upper4 = MODEL.predict(LIGHT.shape(), K).upper_s
    tight = SloTarget(tpot_ms=1000.0 * upper4 * 1.01)
    assert HarliPolicy(MODEL, K, tight).decide(LIGHT, 0.0).level == K
    assert HarliPolicy(MODEL, K, tight, margin=1.1).decide(LIGHT, 0.0).level < K


# -- HarliPolicy: idle and hysteresis ---------------------------------------------------------


def test_idle_engine_gets_level_k_at_once() -> None:
    policy = HarliPolicy(MODEL, K, SLO, hysteresis_iters=8)
    assert policy.decide(HEAVY, 0.0).level == 0
    idle = policy.decide(view(0), 1.0)
    assert (idle.level, idle.reason, idle.predicted_upper_s) == (K, REASON_IDLE, None)
    assert policy.level == K


def test_waiting_requests_are_not_idle() -> None:
    # Nothing running but a long prompt waits: the next iteration prefills it.
    d = HarliPolicy(MODEL, K, SLO).decide(view(0, waiting=2, prefill=4096), 0.0)
    assert d.reason != REASON_IDLE
    assert d.predicted_upper_s is not None


def test_a_level_is_allowed_by_its_own_bound_and_the_isotonic_fit_of_all() -> None:
    slo = SloTarget(tpot_ms=50.0)
    ok, bad = 0.01, 0.1
    fake = TablePredictor([ok, ok, ok, bad, bad])
    policy = HarliPolicy(fake, K, slo, hysteresis_iters=8)
    assert policy.decide(LIGHT, 0.0).level == 2
    # Level 2 alone over: the fit pools 2..4 to 0.04 s, within 50 ms, so 3 and 4 are allowed
    # but 2 itself is not: down to 1 at once, and up to 4 (past 2) after the hysteresis.
    fake.uppers_s = [ok, ok, bad, ok, ok]
    d = policy.decide(LIGHT, 1.0)
    assert (d.level, d.reason, d.predicted_upper_s) == (1, REASON_DOWN, ok)
    levels = [policy.decide(LIGHT, 2.0 + t).level for t in range(7)]
    assert levels == [1] * 6 + [4]  # the 8th decision in a row whose target was 4
    # One level far over holds every level above it back: (0.2 + 3 x 0.01) / 4 > 50 ms.
    fake.uppers_s = [ok, 0.2, ok, ok, ok]
    assert policy.decide(LIGHT, 20.0).level == 0
    fake.uppers_s = [bad, ok, ok, ok, ok]  # a noisy fit says K beats decode alone: not trusted
    d = policy.decide(LIGHT, 21.0)
    assert (d.level, d.predicted_upper_s) == (0, bad) and d.reason.startswith("infeasible")


def test_harli_max_allows_a_level_only_with_every_level_below_it() -> None:
    slo = SloTarget(tpot_ms=50.0)
    ok, bad = 0.01, 0.1
    fake = TablePredictor([ok, bad, ok, ok, ok])  # level 1 alone over
    isotonic = parse_policy("harli", fake, K, slo)
    running_max = parse_policy("harli:max", fake, K, slo)
    assert isotonic.decide(LIGHT, 0.0).level == K  # pooled (0.1 + 3 x 0.01) / 4 < 50 ms
    assert running_max.decide(LIGHT, 0.0).level == 0  # level 1 gates 2..4
    with pytest.raises(ValueError, match="envelope"):
        HarliPolicy(fake, K, slo, envelope="median")


@given(st.lists(st.floats(1e-4, 1.0), min_size=1, max_size=8))
def test_pooled_bounds_are_the_isotonic_fit(values: list[float]) -> None:
    pooled = pooled_bounds(values)
    assert len(pooled) == len(values)
    assert all(a <= b * (1 + 1e-12) for a, b in itertools.pairwise(pooled))
    assert sum(pooled) == pytest.approx(sum(values))
    for level in range(len(values)):
        assert pooled[level] == pytest.approx(isotonic_at(values, level))
    if values == sorted(values):
        assert pooled == pytest.approx(values)


def test_drop_is_immediate_and_rise_waits_hysteresis_iters() -> None:
    n = 8
    policy = HarliPolicy(MODEL, K, SLO, hysteresis_iters=n)
    assert policy.decide(LIGHT, 0.0).level == K  # starts as if idle: no wait to hold K
    d = policy.decide(MEDIUM, 1.0)
    assert (d.level, d.reason) == (2, REASON_DOWN)  # immediate
    levels = [policy.decide(LIGHT, 2.0 + i) for i in range(n)]
    # The level-2 target stays in the window for n - 1 more decisions.
    assert [d.level for d in levels[: n - 1]] == [2] * (n - 1)
    assert all(d.reason == REASON_HOLD for d in levels[: n - 1])
    assert (levels[-1].level, levels[-1].reason) == (K, REASON_UP)
    assert policy.decide(LIGHT, 20.0).reason == REASON_STEADY
    assert policy.decide(HEAVY, 21.0).level == 0  # immediate, all the way down


def test_oscillating_load_does_not_flap() -> None:
    policy = HarliPolicy(MODEL, K, SLO, hysteresis_iters=8)
    decisions = [policy.decide(MEDIUM if t % 2 else LIGHT, float(t)) for t in range(200)]
    levels = [d.level for d in decisions]
    assert levels[0] == K
    assert set(levels[1:]) == {2}  # held at the level feasible under both loads
    changes = sum(a != b for a, b in itertools.pairwise(levels))
    assert changes == 1


def test_rise_goes_only_as_high_as_the_whole_window_allows() -> None:
    policy = HarliPolicy(MODEL, K, SLO, hysteresis_iters=4)
    three = next(v for v in (view(n) for n in range(8, 64)) if highest_feasible(MODEL, v, SLO) == 3)
    policy.decide(MEDIUM, 0.0)
    got = [policy.decide(v, 1.0 + i).level for i, v in enumerate([three, LIGHT, three, LIGHT])]
    assert got == [2, 2, 2, 3]  # 3 feasible in all four, K only in two of them


@settings(max_examples=150, deadline=None)
@given(model=models(), slo=slos, hysteresis=st.integers(1, 10),
       history=st.lists(views, max_size=30), small=views,
       deltas=st.tuples(*[st.integers(0, 64) for _ in range(6)]))
def test_a_larger_batch_never_gets_a_higher_level(
        model: LatencyModel, slo: SloTarget, hysteresis: int, history: list[BatchView],
        small: BatchView, deltas: tuple[int, ...]) -> None:
    big = BatchView(*(a + b for a, b in zip(
        (small.num_running, small.num_waiting, small.decode_tokens, small.prefill_tokens,
         small.context_tokens, small.prefill_attn_tokens), deltas, strict=True)))
    a = HarliPolicy(model, K, slo, hysteresis_iters=hysteresis)
    b = HarliPolicy(model, K, slo, hysteresis_iters=hysteresis)
    for t, v in enumerate(history):
        assert a.decide(v, float(t)) == b.decide(v, float(t))
    assert b.decide(big, 99.0).level <= a.decide(small, 99.0).level


def test_harli_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="levels"):
        HarliPolicy(MODEL, 0, SLO)
    with pytest.raises(ValueError, match="hysteresis_iters"):
        HarliPolicy(MODEL, K, SLO, hysteresis_iters=0)
    with pytest.raises(ValueError, match="margin"):
        HarliPolicy(MODEL, K, SLO, margin=0.0)


def test_batch_view_maps_onto_batch_shape_and_rejects_negatives() -> None:
    v = BatchView(3, 1, 2, 10, 300, 7)
    assert v.shape() == BatchShape(num_seqs=3, decode_tokens=2, prefill_tokens=10,
                                   context_tokens=300, prefill_attn_tokens=7)
    assert not v.idle
    assert BatchView(0, 0, 0, 0, 0).idle
    with pytest.raises(ValueError, match=">= 0"):
        BatchView(1, -1, 0, 0, 0)


# -- baselines and parse_policy ---------------------------------------------------------------


@pytest.mark.parametrize(("policy", "level"), [
    (StaticPolicy(2), 2), (NaivePolicy(K), K), (DecodeOnlyPolicy(), 0)])
def test_baselines_ignore_the_load(policy: StaticPolicy | NaivePolicy | DecodeOnlyPolicy,
                                   level: int) -> None:
    for v in (view(0), LIGHT, HEAVY):
        d = policy.decide(v, 0.0)
        assert d.level == level
        assert d.predicted_upper_s is None


@pytest.mark.parametrize(("spec", "kind", "level"), [
    ("harli", HarliPolicy, None),
    (" Harli ", HarliPolicy, None),
    ("harli:strict", HarliPolicy, None),
    ("harli:max", HarliPolicy, None),
    ("static:0", StaticPolicy, 0),
    ("static:2", StaticPolicy, 2),
    (f"static:{K}", StaticPolicy, K),
    ("naive", NaivePolicy, K),
    ("decode-only", DecodeOnlyPolicy, 0),
])
def test_parse_policy_accepts_each_form(spec: str, kind: type, level: int | None) -> None:
    policy = parse_policy(spec, MODEL, K, SLO)
    assert isinstance(policy, kind)
    if level is not None:
        assert policy.decide(LIGHT, 0.0).level == level


@pytest.mark.parametrize(("spec", "message"), [
    ("", "accepted forms"),
    ("harly", "accepted forms"),
    ("static", "accepted forms"),
    ("static:", "must be an integer"),
    ("static:x", "must be an integer"),
    ("static:1.5", "must be an integer"),
    ("static:\u0661", "must be an integer"),  # an Arabic-Indic 1, which int() reads
    ("static:-1", r"0\.\.4"),
    (f"static:{K + 1}", r"0\.\.4"),
    ("naive:2", "accepted forms"),
    ("harli:loose", "accepted forms"),
    ("decode_only", "accepted forms"),
])
def test_parse_policy_rejects_bad_strings(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_policy(spec, MODEL, K, SLO)
    if message == "accepted forms":
        assert all(form in str(info.value) for form in ("harli", "harli:strict", "static:L",
                                                         "naive", "decode-only"))


# -- HarliPolicy with an error budget ---------------------------------------------------------


class QuantilePredictor(BoundsFromPredict):
    """A fake predictor whose bound depends on the quantile asked: base[level] x tail(q),
    tail 1.2 at q <= 0.9 up to 2.0 at q >= 0.99 (the model's default). Records the
    quantiles asked."""

    TAIL: ClassVar[dict[float, float]] = {0.9: 1.2, 0.95: 1.4, 0.98: 1.7, 0.99: 2.0,
                                          0.995: 2.3, 0.999: 3.0}

    def __init__(self, base_s: Sequence[float]) -> None:
        self.base_s = list(base_s)
        self.asked: list[float | None] = []

    def ratio(self, quantile: float | None) -> float:
        return self.TAIL[0.99 if quantile is None else quantile]

    def predict(self, shape: BatchShape, level: int,
                quantile: float | None = None) -> Prediction:
        self.asked.append(quantile)
        return Prediction(self.base_s[level], self.base_s[level] * self.ratio(quantile))


SLO_10MS = SloTarget(tpot_ms=10.0)


def budgeted(base_s: Sequence[float], slo: SloTarget = SLO_10MS,
             hysteresis: int = 1) -> tuple[HarliPolicy, QuantilePredictor]:
    fake = QuantilePredictor(base_s)
    spec_policy = parse_policy("harli", fake, K, slo)
    assert isinstance(spec_policy, HarliPolicy) and spec_policy.budget is not None
    policy = HarliPolicy(fake, K, slo, hysteresis_iters=hysteresis, budget=spec_policy.budget)
    return policy, fake


def test_a_budget_ahead_of_target_lets_harli_train_where_the_strict_bound_pauses() -> None:
    # Level 0 alone is 6 ms: its 0.99 bound (12 ms) is over a 10 ms SLO, its 0.95 one (8.4)
    # is not; each level adds 0.5 ms.
    base = [0.006 + 0.0005 * lv for lv in range(K + 1)]
    strict = parse_policy("harli:strict", QuantilePredictor(base), K, SloTarget(tpot_ms=10.0))
    assert isinstance(strict, HarliPolicy) and strict.budget is None
    assert strict.decide(LIGHT, 0.0).level == 0

    policy, fake = budgeted(base)
    first = policy.decide(LIGHT, 0.0)
    assert (first.level, first.quantile) == (0, 0.99)  # starts on target
    assert first.reason.startswith(REASON_INFEASIBLE)
    for _ in range(40):  # 4000 tokens, none over the SLO
        policy.on_tokens(100, 0)
    d = policy.decide(LIGHT, 1.0)
    assert d.quantile is not None and d.quantile < 0.99
    assert fake.asked[-1] == d.quantile  # the bound was asked at the budget's quantile
    assert d.level > 0
    assert d.predicted_upper_s == pytest.approx(base[d.level] * fake.ratio(d.quantile))
    assert d.predicted_upper_s <= 0.010
    # Misses over target: back to the tightest bound, and to level 0.
    for _ in range(3):
        policy.on_tokens(100, 5)
    d = policy.decide(LIGHT, 2.0)
    assert d.quantile == 0.999 and d.level == 0


def test_strict_harli_and_the_baselines_ignore_token_counts() -> None:
    base = [0.003] * (K + 1)
    strict = HarliPolicy(QuantilePredictor(base), K, SloTarget(tpot_ms=10.0))
    for policy in (strict, StaticPolicy(2), NaivePolicy(K), DecodeOnlyPolicy()):
        before = policy.decide(LIGHT, 0.0)
        policy.on_tokens(100, 100)
        assert policy.decide(LIGHT, 1.0).level == before.level
    assert strict.decide(LIGHT, 2.0).quantile is None


@settings(max_examples=150, deadline=None)
@given(bases=st.lists(st.floats(1e-3, 0.01), min_size=K + 1, max_size=K + 1),
       steps=st.lists(st.tuples(st.integers(0, 200), st.floats(0.0, 0.05), st.booleans()),
                      min_size=1, max_size=40),
       hysteresis=st.integers(1, 10))
def test_budgeted_harli_never_picks_a_level_over_the_slo_at_the_quantile_it_used(
        bases: list[float], steps: list[tuple[int, float, bool]], hysteresis: int) -> None:
    slo = SloTarget(tpot_ms=10.0)
    policy, fake = budgeted(sorted(bases), slo, hysteresis)
    for t, (tokens, miss_share, idle) in enumerate(steps):
        policy.on_tokens(tokens, int(tokens * miss_share))
        budget = policy.budget
        assert budget is not None
        quantile = budget.quantile()
        d = policy.decide(view(0) if idle else LIGHT, float(t))
        if idle:
            assert (d.level, d.reason) == (K, REASON_IDLE)
            continue
        assert d.quantile == quantile
        upper_at = [fake.predict(LIGHT.shape(), lv, quantile).upper_s for lv in range(K + 1)]
        check_safe(d, upper_at, 1.0, slo)


def test_with_rates_harli_runs_the_fastest_feasible_level_while_decode_is_busy() -> None:
    from harli.scheduler.rates import LevelRates

    rates = LevelRates(K, min_samples=1)
    for level, tok_s in {1: 1200, 2: 2500, 3: 1700, 4: 2100}.items():
        rates.observe(1, level, tok_s, 1.0)
    fake = TablePredictor([0.001] * (K + 1))  # every level feasible
    policy = HarliPolicy(fake, K, SloTarget(tpot_ms=50.0), hysteresis_iters=1, rates=rates)
    d = policy.decide(LIGHT, 0.0)
    assert d.level == 2 and "level 2 of 4" in d.reason
    assert d.predicted_upper_s == 0.001
    assert policy.level == K  # the hysteresis state is the allowed level, not the rate's
    assert policy.decide(view(0), 1.0).level == K  # idle: the highest, whatever the rates
    fake.uppers_s = [0.001, 0.001, 0.1, 0.1, 0.1]  # only level 1 feasible now
    assert policy.decide(LIGHT, 2.0).level == 1


@settings(max_examples=150, deadline=None)
@given(tables=st.lists(st.lists(st.floats(1e-3, 0.1), min_size=K + 1, max_size=K + 1),
                       min_size=1, max_size=30),
       tok_s=st.lists(st.integers(0, 5000), min_size=K, max_size=K),
       hysteresis=st.integers(1, 10))
def test_harli_with_rates_stays_within_the_slo(tables: list[list[float]], tok_s: list[int],
                                               hysteresis: int) -> None:
    from harli.scheduler.rates import LevelRates

    rates = LevelRates(K, min_samples=1)
    for level, rate in enumerate(tok_s, start=1):
        rates.observe(1, level, rate, 1.0)
    slo = SloTarget(tpot_ms=50.0)
    fake = TablePredictor(tables[0])
    policy = HarliPolicy(fake, K, slo, hysteresis_iters=hysteresis, rates=rates)
    for t, uppers in enumerate(tables):
        fake.uppers_s = uppers
        check_safe(policy.decide(view(4), float(t)), uppers, 1.0, slo)


# -- SLO --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tpot_ms", "attainment"), [(0.0, 0.9), (-1.0, 0.9), (float("inf"), 0.9),
                                                     (50.0, 0.0), (50.0, 1.01)])
def test_slo_target_validates(tpot_ms: float, attainment: float) -> None:
    with pytest.raises(ValueError, match="SloTarget"):
        SloTarget(tpot_ms, attainment)


def test_slo_target_defaults_and_frozen() -> None:
    slo = SloTarget(50.0)
    assert (slo.attainment, slo.tpot_s) == (0.99, 0.05)
    assert SloTarget(50.0, 1.0).attainment == 1.0
    with pytest.raises(AttributeError):
        slo.tpot_ms = 10.0  # type: ignore[misc]  # checking that it is frozen


def test_slo_counter_per_token_by_hand() -> None:
    c = SloCounter(SloTarget(50.0, attainment=0.75))
    assert c.per_token() is None
    c.on_token_gaps([])
    assert c.per_token() is None
    c.on_token_gaps([0.010, 0.050, 0.051, 0.200])  # 0.050 is on the bound: meets it
    assert (c.tokens, c.tokens_ok, c.per_token()) == (4, 2, 0.5)
    c.on_token_gaps([0.0, 0.02, 0.03, 0.04])
    assert (c.tokens, c.tokens_ok, c.per_token()) == (8, 6, 0.75)
    with pytest.raises(ValueError, match="gaps"):
        c.on_token_gaps([0.01, -0.001])
    with pytest.raises(ValueError, match="gaps"):
        c.on_token_gaps([float("nan")])


def test_slo_counter_per_request_by_hand() -> None:
    c = SloCounter(SloTarget(50.0))
    assert c.per_request() is None
    c.on_request(0.0, 0.0, 1)  # one token: no TPOT
    c.on_request(3.0, 3.0, 0)
    assert c.per_request() is None
    assert c.requests_skipped == 2
    c.on_request(0.0, 0.5, 11)  # mean TPOT 50 ms: on the bound
    c.on_request(1.0, 2.0, 11)  # 100 ms
    c.on_request(10.0, 10.03, 2)  # 30 ms
    c.on_request(5.0, 5.0, 3)  # all at once: 0 ms
    assert (c.requests, c.requests_ok, c.requests_skipped) == (4, 3, 2)
    assert c.per_request() == 0.75
    assert c.per_token() is None  # the two counts are independent
    with pytest.raises(ValueError, match="first_s <= last_s"):
        c.on_request(2.0, 1.0, 5)
    with pytest.raises(ValueError, match="n_tokens"):
        c.on_request(0.0, 1.0, -1)


def test_slo_counter_one_slow_gap_fails_the_token_not_the_request() -> None:
    c = SloCounter(SloTarget(50.0))
    times = [0.0, 0.01, 0.02, 0.12, 0.13, 0.14]  # one 100 ms stall in 5 gaps
    c.on_token_gaps([b - a for a, b in itertools.pairwise(times)])
    c.on_request(times[0], times[-1], len(times))  # mean 28 ms
    assert c.per_token() == pytest.approx(0.8)
    assert c.per_request() == 1.0


# -- cost -------------------------------------------------------------------------------------
# What a decision costs in microseconds is a benchmark (python -m harli.bench.decision_cost);
# what it asks of the predictor is tested here.


class CountingModel:
    """A ``LatencyPredictor`` that records every call the policy makes to the model it wraps."""

    def __init__(self, model: LatencyModel) -> None:
        self._model = model
        self.calls: list[tuple[str, int]] = []

    def predict(self, shape: BatchShape, level: int,
                quantile: float | None = None) -> Prediction:
        self.calls.append(("predict", level))
        return self._model.predict(shape, level, quantile)

    def upper_bounds(self, shape: BatchShape, top_level: int,
                     quantile: float | None = None) -> list[float]:
        self.calls.append(("upper_bounds", top_level))
        return self._model.upper_bounds(shape, top_level, quantile)

    def slowdown(self, shape: BatchShape, level: int) -> float:
        self.calls.append(("slowdown", level))
        return self._model.slowdown(shape, level)


def _warm_model() -> LatencyModel:
    """``make_model()`` after live iterations at every level: each level has an online
    correction, so a bound takes its full path."""
    model, fits = make_model(), make_model()
    rng = random.Random(3)
    for _ in range(200):
        for lv in range(K + 1):
            shape = view(rng.randint(1, 48), prefill=rng.choice([0, 0, 0, 256])).shape()
            model.observe(shape, lv, fits.predict(shape, lv).estimate_s * rng.uniform(0.9, 1.2),
                          now=0.0)
    return model


WARM_MODEL = _warm_model()


@settings(max_examples=200, deadline=None)
@given(stream=st.lists(views, min_size=1, max_size=40),
       with_budget=st.booleans(), infeasible_slowdown=st.sampled_from([1.0, 1.3]))
def test_a_decision_asks_the_predictor_once_for_every_levels_bound(
        stream: list[BatchView], with_budget: bool, infeasible_slowdown: float) -> None:
    """The daemon decides before every decode iteration: one ``upper_bounds`` call (all
    levels in one pass), never a ``predict`` per level; nothing when idle; and only a load
    decode alone cannot serve asks the fitted slowdowns, level by level from 1, of a policy
    allowed one."""
    model = CountingModel(WARM_MODEL)
    budget = ErrorBudget(SLO.attainment, 1000, 10.0) if with_budget else None
    policy = HarliPolicy(model, K, SLO, budget=budget, infeasible_slowdown=infeasible_slowdown)
    for t, v in enumerate(stream):
        model.calls.clear()
        decision = policy.decide(v, float(t))
        if v.idle:
            assert model.calls == []
            continue
        assert model.calls[0] == ("upper_bounds", K)
        rest = model.calls[1:]
        assert [kind for kind, _ in rest] == ["slowdown"] * len(rest)
        assert [level for _, level in rest] == list(range(1, len(rest) + 1))
        if rest:
            assert decision.kind == REASON_INFEASIBLE and infeasible_slowdown > 1.0


def test_a_decisions_kind_is_its_reasons_first_word() -> None:
    assert HarliPolicy(MODEL, K, SLO).decide(HEAVY, 0.0).kind == REASON_INFEASIBLE
    idle = BatchView(num_running=0, num_waiting=0, decode_tokens=0, prefill_tokens=0,
                     context_tokens=0)
    assert HarliPolicy(MODEL, K, SLO).decide(idle, 0.0).kind == "idle"
    assert StaticPolicy(2).decide(HEAVY, 0.0).kind == "static"
    assert NaivePolicy(K).decide(HEAVY, 0.0).kind == "naive"
    assert DecodeOnlyPolicy().decide(HEAVY, 0.0).kind == "decode-only"
    rate = PolicyDecision(2, REASON_STEADY + REASON_RATE.format(level=2, allowed=4), None)
    assert rate.kind == REASON_STEADY


# -- probes of unmeasured levels ---------------------------------------------------------------


class StepBounds(BoundsFromPredict):
    """Level L's bound is (1 + L) x 4 ms; only the levels in ``known`` are measured."""

    def __init__(self, known: set[int]) -> None:
        self.known = known

    def predict(self, shape: BatchShape, level: int,
                quantile: float | None = None) -> Prediction:
        return Prediction(0.004 * (1 + level), 0.004 * (1 + level))

    def slowdown(self, shape: BatchShape, level: int) -> float:
        return 1.0 + level

    def measured(self, level: int) -> bool:
        return level in self.known


def probing_policy(known: set[int], spare: bool = True,
                   rates: object = None) -> tuple[HarliPolicy, StepBounds, ErrorBudget]:
    model = StepBounds(known)
    budget = ErrorBudget(0.99, 1000, 10.0)
    if spare:
        for _ in range(50):
            budget.on_tokens(100, 0)  # every token within the SLO: misses to spare
    return HarliPolicy(model, K, SloTarget(tpot_ms=9.0), hysteresis_iters=1, budget=budget,
                       rates=rates), model, budget  # type: ignore[arg-type]


def test_an_unmeasured_level_above_the_allowed_one_is_probed_then_left_alone() -> None:
    from harli.scheduler.policy import PROBE_EVERY, PROBE_ITERS

    # 9 ms allows level 1 (8 ms); level 2 (12 ms, a fallback's bound) is not measured.
    policy, model, _ = probing_policy({0, 1})
    levels = [policy.decide(view(4), 0.0) for _ in range(PROBE_EVERY + PROBE_ITERS + 5)]
    probes = [i for i, d in enumerate(levels) if d.kind == "probe"]
    # One probe from the first decision, the next PROBE_EVERY decisions after it began.
    assert probes == [*range(PROBE_ITERS), *range(PROBE_EVERY, PROBE_EVERY + PROBE_ITERS)]
    assert {levels[i].level for i in probes} == {2}
    assert "level 2 has no measured slowdown yet" in levels[0].reason
    assert all(d.level == 1 for d in levels[PROBE_ITERS:PROBE_EVERY])  # back to the allowed
    model.known.add(2)  # learnt: no more probes of it; level 3 is not above the allowed one
    assert all(policy.decide(view(4), 0.0).kind != "probe"
               for _ in range(2 * (PROBE_EVERY + PROBE_ITERS)))


def test_no_probe_without_misses_to_spare_and_a_probe_stops_when_they_run_out() -> None:
    policy, _, _ = probing_policy({0, 1}, spare=False)  # a fresh budget: on target
    assert all(policy.decide(view(4), 0.0).kind != "probe" for _ in range(50))
    policy, _, budget = probing_policy({0, 1})
    assert policy.decide(view(4), 0.0).kind == "probe"
    for _ in range(20):
        budget.on_tokens(10, 1)  # 10 % of the latest tokens missed: nothing to spare now
    assert not budget.spare
    d = policy.decide(view(4), 0.0)
    assert d.kind != "probe" and d.level == 1
    strict = HarliPolicy(StepBounds({0, 1}), K, SloTarget(tpot_ms=9.0), hysteresis_iters=1)
    assert all(strict.decide(view(4), 0.0).kind != "probe" for _ in range(50))  # no budget


def test_no_probe_of_a_level_whose_rate_is_under_a_measured_ones() -> None:
    from harli.scheduler.rates import LevelRates

    rates = LevelRates(K, min_samples=3)
    for _ in range(3):
        rates.observe(1, 1, 1000, 1.0)  # level 1: 1000 tok/s, measured
    rates.observe_unfinished(1, 2, 1000, 5.0)  # level 2: under 200 tok/s, left
    assert rates.left[2]
    policy, _, _ = probing_policy({0, 1}, rates=rates)
    assert all(policy.decide(view(4), 0.0).kind != "probe" for _ in range(50))
    # Idle and infeasible decisions never probe.
    policy, _, _ = probing_policy({0})
    assert policy.decide(view(0), 0.0).kind == "idle"


def test_after_an_infeasible_burst_the_level_returns_without_waiting_out_the_hysteresis() -> None:
    """The pause was for a load decode alone could not serve: once the load is feasible again
    the level is the one feasible before it, at once. A load that only got lighter still
    rises through the hysteresis."""
    policy = HarliPolicy(MODEL, K, SLO, hysteresis_iters=4)
    assert [policy.decide(MEDIUM, float(t)).level for t in range(4)] == [2] * 4
    assert [policy.decide(HEAVY, 4.0 + t).level for t in range(3)] == [0] * 3  # paused
    assert policy.decide(MEDIUM, 7.0).level == 2  # back at once, reason "up"
    # A feasible drop (LIGHT -> MEDIUM -> LIGHT) still waits out the hysteresis going up.
    light = [policy.decide(view(1), 8.0 + t).level for t in range(6)]
    assert light[0] == 2 and light[-1] > 2
