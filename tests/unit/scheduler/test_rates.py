"""``LevelRates``: the finetune's measured tokens/s per level beside a busy decode, and which
level up to a feasible one trains fastest (the feasible one itself until it is measured, then
each lower one in turn until it is measured or bounded under a measured one)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harli.scheduler.rates import LevelRates

K = 4


def measured(rates_tok_s: dict[int, float], job_id: int = 1) -> LevelRates:
    r = LevelRates(K, min_samples=3)
    for level, rate in rates_tok_s.items():
        for _ in range(3):
            r.observe(job_id, level, int(rate), 1.0)
    return r


def test_a_fresh_table_is_plain_harli_then_tries_each_lower_level() -> None:
    r = LevelRates(K, min_samples=2)
    assert [r.best(u) for u in range(K + 1)] == [0, 1, 2, 3, 4]  # plain harli
    for _ in range(2):
        r.observe(7, 4, 2000, 1.0)
    assert r.best(K) == 3  # 4 measured: the highest unmeasured level below it next
    for _ in range(2):
        r.observe(7, 2, 2500, 1.0)
    assert [r.best(u) for u in range(K + 1)] == [0, 1, 1, 3, 3]
    for _ in range(2):
        r.observe(7, 3, 1000, 1.0)
        r.observe(7, 1, 900, 1.0)
    assert [r.best(u) for u in range(K + 1)] == [0, 1, 2, 2, 2]  # all measured: the fastest


def test_a_level_that_never_finishes_beside_a_busy_decode_is_capped_and_left() -> None:
    """The CPU shape: level 4's two threads, one on decode's busy core, do not finish a
    1024-token micro-step within a busy stretch; harli alone must still learn level 2."""
    r = LevelRates(K, min_samples=3, min_unfinished_s=1.0)
    r.observe_unfinished(1, 4, 1024, 0.5)  # too short a stretch to say anything
    assert r.samples[4] == 0 and r.best(K) == 4
    for seconds in (4.0, 2.0, 6.0):
        r.observe_unfinished(1, 4, 1024, seconds)
    # 256 first; the 2 s bound is over it; the 6 s one pulls it by alpha toward 171.
    assert r.samples[4] == 3 and r.rate_tok_s[4] == pytest.approx(256 + 0.2 * (1024 / 6 - 256))
    assert r.best(K) == 3
    for _ in range(3):
        r.observe_unfinished(1, 3, 1024, 5.0)
    assert r.best(K) == 2
    for _ in range(3):
        r.observe(1, 2, 1700, 1.0)
    assert r.best(K) == 1
    for _ in range(3):
        r.observe(1, 1, 850, 1.0)
    assert [r.best(u) for u in range(K + 1)] == [0, 1, 2, 2, 2]
    r.observe_unfinished(1, 2, 8192, 2.0)  # a bound over its rate changes nothing
    assert r.rate_tok_s[2] == pytest.approx(1700.0)
    r.observe_unfinished(1, 2, 1024, 2.0)  # one under it moves it by alpha, not to it
    assert r.rate_tok_s[2] == pytest.approx(1700 + 0.2 * (512 - 1700)) and r.best(K) == 2


def test_a_level_left_for_a_faster_one_is_not_tried_again_when_that_one_dips() -> None:
    """Tried again each time level 2's rate dips under their caps, levels 1 and 3 would take
    ~0.5 s each time, ~20 % of harli's busy time at a few hundred tok/s."""
    r = LevelRates(K, min_samples=3)
    for _ in range(3):
        r.observe(1, 2, 1900, 1.0)
        r.observe(1, 4, 400, 1.0)
    r.bound_running(1, 3, 1024, 0.6)  # 1707 at most: under 1900, left
    r.bound_running(1, 1, 1024, 0.6)
    assert r.left[3] and r.left[1] and r.best(K) == 2
    for _ in range(10):  # level 2 slows to 1500: under the caps, yet neither is tried again
        r.observe(1, 2, 1500, 1.0)
    assert r.best(K) == 2 and r.best(1) == 1  # upto 1: nothing measured to prefer
    r.observe(2, 2, 1500, 1.0)  # a new job starts over
    assert not any(r.left)


def test_a_running_bound_caps_a_level_without_a_sample() -> None:
    r = LevelRates(K, min_samples=3)
    for _ in range(3):
        r.observe(1, 2, 1700, 1.0)
        r.observe(1, 4, 400, 1.0)
    assert r.best(K) == 3
    r.bound_running(1, 3, 1024, 0.5)  # 2048 at most: over level 2's rate, keep trying
    assert r.best(K) == 3 and r.cap_tok_s[3] == 2048
    r.bound_running(2, 3, 1024, 5.0)  # another job's micro-step says nothing of this one's
    r.bound_running(1, 3, 1024, 0.0)
    assert r.cap_tok_s[3] == 2048
    r.bound_running(1, 3, 1024, 1.0)  # 1024 at most: under 1700
    assert r.cap_tok_s[3] == 1024 and r.samples[3] == 0 and r.rate_tok_s[3] == 0.0
    assert r.best(K) == 1
    r.bound_running(1, 3, 1024, 0.8)  # a looser bound never raises the cap
    assert r.cap_tok_s[3] == 1024


def _expected(r: LevelRates, upto: int, skipped: set[int], min_samples: int) -> tuple[str, int]:
    """The level to try next (from upto down, the first unmeasured one whose bound does not
    put it under a measured level), else ("fastest", 0)."""
    measured = [r.rate_tok_s[lv] for lv in range(1, upto + 1)
                if lv not in skipped and r.samples[lv] >= min_samples]
    below = [lv for lv in range(upto, 0, -1)
             if lv not in skipped and r.samples[lv] < min_samples and not r.left[lv]
             and not r.cap_tok_s[lv] < max(measured, default=0.0)]
    if below:
        return "explore", below[0]
    return "fastest", 0


def _check_fastest(r: LevelRates, best: int, allowed: list[int], min_samples: int) -> None:
    """``best`` is the fastest measured allowed level, and every unmeasured one is left or
    capped under it; with none measured (all left), the allowed level itself."""
    measured = [lv for lv in allowed if r.samples[lv] >= min_samples]
    assert all(r.left[lv] or r.cap_tok_s[lv] < r.rate_tok_s[best]
               for lv in allowed if lv not in measured)
    if not measured:
        assert best == max(allowed)
        return
    assert best in measured
    assert r.rate_tok_s[best] == max(r.rate_tok_s[lv] for lv in measured)


def test_a_level_bounded_under_a_measured_one_is_left_after_one_bound() -> None:
    """Level 4 measured at ~410 tok/s beside a busy decode, level 2 at ~1700: one
    censored bound of level 3 (268 tok/s) already says it cannot beat level 2, so harli does
    not spend the minutes three such bounds take at level 3."""
    r = LevelRates(K, min_samples=3)
    for _ in range(3):
        r.observe_unfinished(1, 4, 1024, 2.5)
        r.observe(1, 2, 1700, 1.0)
    assert r.best(K) == 3  # level 3 not tried yet
    r.observe_unfinished(1, 3, 1024, 3.8)  # 269 tok/s at most: under level 2's 1700
    assert r.samples[3] == 1 and r.best(K) == 1  # left for the next unmeasured one, level 1
    r.observe_unfinished(1, 1, 4096, 2.0)  # a bound over 1700 leaves level 1 to be tried
    assert r.cap_tok_s[1] == 2048 and r.best(K) == 1
    r.observe_unfinished(1, 1, 1024, 1.2)  # 853 at most: settled too
    assert [r.best(u) for u in range(K + 1)] == [0, 1, 2, 2, 2]
    # A bound over the measured level's rate is no reason to leave a level.
    fresh = LevelRates(K, min_samples=3)
    for _ in range(3):
        fresh.observe(1, 4, 400, 1.0)
    fresh.observe_unfinished(1, 3, 1024, 2.0)  # 512 at most, over 400: try it further
    assert fresh.best(K) == 3


def test_the_fastest_measured_level_up_to_the_allowed_one_wins() -> None:
    # The CPU shape: level 4 spills onto decode's core and trains slower than 2 beside it.
    r = measured({1: 1200.0, 2: 2500.0, 3: 1700.0, 4: 2100.0})
    assert [r.best(u) for u in range(K + 1)] == [0, 1, 2, 2, 2]
    assert r.snapshot() == {1: 1200.0, 2: 2500.0, 3: 1700.0, 4: 2100.0}


def test_a_rate_follows_its_level_and_a_new_job_starts_over() -> None:
    r = measured({2: 2500.0, 4: 2100.0, 1: 1000.0, 3: 1000.0})
    assert r.best(K) == 2
    for _ in range(20):  # level 2 slows down (the host, or the job's data)
        r.observe(1, 2, 1500, 1.0)
    assert r.best(K) == 4
    r.observe(2, 1, 100, 1.0)  # another job: nothing measured for it but level 1 once
    assert r.snapshot() == {}
    assert r.best(K) == 4


@settings(max_examples=200, deadline=None)
@given(obs=st.lists(st.tuples(st.integers(1, K), st.integers(0, 5000),
                              st.floats(0.01, 10.0)), max_size=60))
def test_best_is_always_a_level_within_one_to_the_allowed_one(
        obs: list[tuple[int, int, float]]) -> None:
    r = LevelRates(K, min_samples=2)
    for level, tokens, seconds in obs:
        (r.observe_unfinished if tokens % 3 == 0 else r.observe)(1, level, tokens, seconds)
    for upto in range(K + 1):
        best = r.best(upto)
        assert (best == 0) if upto == 0 else (1 <= best <= upto)
        if not upto:
            continue
        kind, level = _expected(r, upto, set(), 2)
        if kind != "fastest":
            assert best == level
        else:  # every level up to upto measured or capped under one: the fastest measured
            _check_fastest(r, best, list(range(1, upto + 1)), 2)


@settings(max_examples=200, deadline=None)
@given(obs=st.lists(st.tuples(st.integers(1, K), st.integers(0, 5000),
                              st.floats(0.01, 10.0)), max_size=60),
       skipped=st.sets(st.integers(1, K - 1)))
def test_best_never_picks_a_skipped_level(obs: list[tuple[int, int, float]],
                                          skipped: set[int]) -> None:
    r = LevelRates(K, min_samples=2)
    for level, tokens, seconds in obs:
        (r.observe_unfinished if tokens % 3 == 0 else r.observe)(1, level, tokens, seconds)
    for upto in range(1, K + 1):
        if upto in skipped:
            continue  # the policy never allows a skipped level itself
        best = r.best(upto, sorted(skipped))
        assert 1 <= best <= upto and best not in skipped
        kind, level = _expected(r, upto, skipped, 2)
        if kind != "fastest":
            assert best == level
        else:
            _check_fastest(r, best, [lv for lv in range(1, upto + 1) if lv not in skipped], 2)
    assert r.best(K, []) == r.best(K)  # nothing skipped: the O(1) answer


CPU_DOMINATION = [None, 2, None, 4, None]  # 2 cores, 4 levels: 1 idles level 2's thread


def test_a_dominated_level_is_neither_tried_nor_chosen_while_its_dominator_is_allowed() -> None:
    """Levels 3 and 1 only idle more than level 4 or 2 on the same threads and cores, so
    neither can train faster beside a busy decode: no turn spends time trying them."""
    r = LevelRates(K, min_samples=3, dominated_by=CPU_DOMINATION)
    assert [r.best(u) for u in range(K + 1)] == [0, 1, 2, 3, 4]  # plain harli at first
    for _ in range(3):
        r.observe(1, 4, 460, 1.0)
    assert r.best(K) == 2  # not 3: level 4, allowed, trains at least as fast
    for _ in range(3):
        r.observe(1, 2, 2000, 1.0)
    # Level 1 never tried (2 covers it); level 3, when 4 is not allowed, capped at level
    # 4's 460 under level 2's 2000 and left untried.
    assert [r.best(u) for u in range(K + 1)] == [0, 1, 2, 2, 2]
    assert r.samples[1] == r.samples[3] == 0 and r.left[3] and not r.left[1]
    # Level 2 over its bound: nothing covers level 1, which may beat level 4's 460 (it can
    # train up to level 2's 2000), so it is tried; level 3 stays left.
    assert r.best(K, [2]) == 1 and r.best(3, [2]) == 1


def test_a_dominated_level_is_tried_when_its_dominator_is_not_allowed_and_could_win() -> None:
    r = LevelRates(K, min_samples=3, dominated_by=CPU_DOMINATION)
    for _ in range(3):
        r.observe(1, 4, 3000, 1.0)
    assert r.best(K) == 2  # 3 covered by 4
    for _ in range(3):
        r.observe(1, 2, 2000, 1.0)
    assert r.best(K) == 4
    # Level 3 may beat level 2 (its dominator trains 3000): with 4 not allowed, it is tried.
    assert r.best(3) == 3 and not r.left[3]


@settings(max_examples=200, deadline=None)
@given(obs=st.lists(st.tuples(st.integers(1, K), st.integers(0, 5000),
                              st.floats(0.01, 10.0)), max_size=60),
       skipped=st.sets(st.integers(1, K - 1)))
def test_best_never_picks_a_level_whose_dominator_is_allowed(
        obs: list[tuple[int, int, float]], skipped: set[int]) -> None:
    r = LevelRates(K, min_samples=2, dominated_by=CPU_DOMINATION)
    for level, tokens, seconds in obs:
        (r.observe_unfinished if tokens % 3 == 0 else r.observe)(1, level, tokens, seconds)
    for upto in range(1, K + 1):
        if upto in skipped:
            continue
        best = r.best(upto, sorted(skipped))
        assert 1 <= best <= upto and best not in skipped
        m = CPU_DOMINATION[best]
        assert m is None or m > upto or m in skipped, (best, upto, skipped)


def test_domination_must_point_to_a_higher_level() -> None:
    for bad in ([1], [None, 1], [None, 0], [None, K + 1], [None, None, None, None, None, 5]):
        with pytest.raises(ValueError, match="dominated_by"):
            LevelRates(K, dominated_by=bad)
    assert LevelRates(K, dominated_by=[None, 2]).dominated_by == [None, 2, None, None, None]


def test_bad_observations_and_settings_are_named() -> None:
    r = LevelRates(K)
    with pytest.raises(ValueError, match="level"):
        r.observe(1, 0, 10, 1.0)
    with pytest.raises(ValueError, match="level"):
        r.observe(1, K + 1, 10, 1.0)
    with pytest.raises(ValueError, match="seconds"):
        r.observe(1, 1, 10, 0.0)
    with pytest.raises(ValueError, match="tokens"):
        r.observe(1, 1, -1, 1.0)
    assert r.snapshot() == {} and r.job_id is None
    for kwargs, name in (({"levels": 0}, "levels"), ({"levels": K, "alpha": 0.0}, "alpha"),
                         ({"levels": K, "min_samples": 0}, "min_samples")):
        with pytest.raises(ValueError, match=name):
            LevelRates(**kwargs)  # type: ignore[arg-type]


def test_levels_on_decodes_cores_are_tried_last_and_a_slow_one_is_cut_short() -> None:
    """2 cores, 4 levels: levels 3 and 4 put a thread on decode's core. A fresh table tries
    level 2 first (1 is dominated by it), so that level 4's trial, next, has a measured rate
    to be bounded under and ends within a fraction of its first micro-step."""
    r = LevelRates(K, min_samples=3, dominated_by=CPU_DOMINATION,
                   spills=[False, False, False, True, True])
    assert [r.best(u) for u in range(K + 1)] == [0, 1, 2, 2, 2]
    for _ in range(3):
        r.observe(1, 2, 1700, 1.0)
    assert r.best(K) == 4  # the spilling level's turn
    r.bound_running(1, 4, 512, 1.0)  # its micro-step in flight: under 512 tok/s after 1 s
    assert r.left[4] and r.best(K) == 2 and r.best(3) == 2
    # With nothing spilling the order is plain harli's, as before.
    assert LevelRates(K, spills=[False] * (K + 1)).best(K) == K
    with pytest.raises(ValueError, match="spills"):
        LevelRates(K, spills=[False] * (K + 2))
