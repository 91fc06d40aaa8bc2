"""``LevelRates``: the finetune's measured tokens/s per level beside a busy decode, and which
level up to a feasible one trains fastest (the feasible one itself until it is measured)."""

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


def test_a_fresh_table_is_plain_harli_and_only_measured_levels_compete() -> None:
    r = LevelRates(K, min_samples=2)
    assert [r.best(u) for u in range(K + 1)] == [0, 1, 2, 3, 4]  # plain harli
    for _ in range(2):
        r.observe(7, 4, 2000, 1.0)
    assert r.best(K) == 4  # the only measured level up to 4
    for _ in range(2):
        r.observe(7, 2, 2500, 1.0)
    assert [r.best(u) for u in range(K + 1)] == [0, 1, 2, 3, 2]
    # Level 3 is unmeasured: allowed 3, it runs (and gets measured); it never displaces a
    # measured level when more is allowed.
    for _ in range(2):
        r.observe(7, 3, 1000, 1.0)
    assert [r.best(u) for u in range(K + 1)] == [0, 1, 2, 2, 2]


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
        r.observe(1, level, tokens, seconds)
    for upto in range(K + 1):
        best = r.best(upto)
        assert (best == 0) if upto == 0 else (1 <= best <= upto)
        measured_levels = [lv for lv in range(1, upto + 1) if r.samples[lv] >= 2]
        if upto and upto not in measured_levels:
            assert best == upto  # unmeasured: plain harli's level
        elif upto:  # the fastest measured one
            assert best in measured_levels
            assert r.rate_tok_s[best] == max(r.rate_tok_s[lv] for lv in measured_levels)


@settings(max_examples=200, deadline=None)
@given(obs=st.lists(st.tuples(st.integers(1, K), st.integers(0, 5000),
                              st.floats(0.01, 10.0)), max_size=60),
       skipped=st.sets(st.integers(1, K - 1)))
def test_best_never_picks_a_skipped_level(obs: list[tuple[int, int, float]],
                                          skipped: set[int]) -> None:
    r = LevelRates(K, min_samples=2)
    for level, tokens, seconds in obs:
        r.observe(1, level, tokens, seconds)
    for upto in range(1, K + 1):
        if upto in skipped:
            continue  # the policy never allows a skipped level itself
        best = r.best(upto, sorted(skipped))
        assert 1 <= best <= upto and best not in skipped
        measured = [lv for lv in range(1, upto + 1) if r.samples[lv] >= 2 and lv not in skipped]
        if upto not in measured:
            assert best == upto
        else:
            assert r.rate_tok_s[best] == max(r.rate_tok_s[lv] for lv in measured)
    assert r.best(K, []) == r.best(K)  # nothing skipped: the O(1) answer


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
