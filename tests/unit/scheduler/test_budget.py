"""``ErrorBudget``: the quantile harli's bound stands for, from the tokens measured against the
SLO (neutral start, loosening while none miss, tightening when they run over, never looser
than the budget allows, and never looser for one more miss)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harli.scheduler.budget import BOUND_QUANTILES, ErrorBudget

feeds = st.lists(st.tuples(st.integers(0, 64), st.floats(0.0, 1.0)), max_size=60).map(
    lambda xs: [(n, int(n * f)) for n, f in xs])


def fed(feed: list[tuple[int, int]], **kw: float) -> ErrorBudget:
    b = ErrorBudget(kw.get("attainment", 0.99), int(kw.get("window", 1000)),
                    kw.get("max_factor", 10.0))
    for tokens, missed in feed:
        b.on_tokens(tokens, missed)
    return b


def test_starts_on_target_at_the_attainment_quantile() -> None:
    b = ErrorBudget(0.99, 1000, 10.0)
    assert b.miss_share == pytest.approx(0.01)
    assert b.allowed_miss() == pytest.approx(0.01)
    assert b.quantile() == 0.99
    assert ErrorBudget(0.97, 1000, 10.0).quantile() == 0.97  # the target joins the ladder


def test_clean_tokens_loosen_it_step_by_step_down_to_the_cap() -> None:
    b = ErrorBudget(0.99, 1000, 10.0)
    seen = [b.quantile()]
    for _ in range(100):
        b.on_tokens(100, 0)
        seen.append(b.quantile())
    assert seen == sorted(seen, reverse=True)  # only ever looser
    assert set(seen) == {0.99, 0.98, 0.95, 0.9}
    assert b.allowed_miss() == pytest.approx(0.1, rel=0.01)  # max_factor x 1 %
    # A cap of 5x stops at 0.95: 1 - 5 % exactly.
    assert fed([(100, 0)] * 100, max_factor=5.0).quantile() == 0.95


def test_misses_on_target_hold_it_and_over_target_tighten_it() -> None:
    on_target = fed([(100, 1)] * 200)
    assert on_target.quantile() == 0.99
    over = fed([(100, 3)] * 50)
    assert over.allowed_miss() == 0.0
    assert over.quantile() == max(BOUND_QUANTILES)
    # The window forgets: clean tokens bring it back, first to the target, then looser.
    for _ in range(30):
        over.on_tokens(100, 0)
    assert over.quantile() <= 0.99


def test_behind_only_while_the_window_misses_more_than_the_target() -> None:
    assert not ErrorBudget(0.99, 1000, 10.0).behind  # the prior sits on target, not over it
    assert not fed([(100, 1)] * 200).behind
    assert not fed([(100, 0)] * 20).behind
    over = fed([(100, 2)] * 20)
    assert over.behind
    for _ in range(40):
        over.on_tokens(100, 0)
    assert not over.behind


def test_a_burst_of_misses_tightens_at_once() -> None:
    b = fed([(100, 0)] * 50)
    assert b.quantile() == 0.9
    b.on_tokens(8, 8)  # one slow iteration of a batch of 8
    b.on_tokens(8, 8)
    assert b.quantile() > 0.9


@settings(max_examples=200, deadline=None)
@given(feed=feeds, attainment=st.sampled_from([0.9, 0.95, 0.99, 0.995, 1.0]),
       max_factor=st.floats(1.0, 20.0), window=st.integers(1, 5000))
def test_never_looser_than_allowed_and_within_the_cap(
        feed: list[tuple[int, int]], attainment: float, max_factor: float,
        window: int) -> None:
    b = fed(feed, attainment=attainment, max_factor=max_factor, window=window)
    target = 1.0 - attainment
    assert 0.0 <= b.allowed_miss() <= max_factor * target + 1e-12
    ladder = sorted({*BOUND_QUANTILES, attainment})
    assert b.quantile() in ladder
    assert b.quantile() >= min(ladder[-1], 1.0 - b.allowed_miss() - 1e-9)
    if attainment == 1.0:
        assert b.quantile() == 1.0  # no budget to spend


@settings(max_examples=200, deadline=None)
@given(feed=feeds, extra=st.integers(1, 8))
def test_one_more_miss_never_loosens_it(feed: list[tuple[int, int]], extra: int) -> None:
    clean = fed(feed)
    clean.on_tokens(extra, 0)
    missed = fed(feed)
    missed.on_tokens(extra, extra)
    assert missed.quantile() >= clean.quantile()
    assert missed.miss_share >= clean.miss_share


def test_bad_counts_and_settings_are_named() -> None:
    b = ErrorBudget(0.99, 1000, 10.0)
    with pytest.raises(ValueError, match="missed <= tokens"):
        b.on_tokens(3, 4)
    with pytest.raises(ValueError, match="missed <= tokens"):
        b.on_tokens(3, -1)
    assert b.quantile() == 0.99  # nothing counted
    with pytest.raises(ValueError, match="attainment"):
        ErrorBudget(0.0, 1000, 10.0)
    with pytest.raises(ValueError, match="window_tokens"):
        ErrorBudget(0.99, 0, 10.0)
    with pytest.raises(ValueError, match="max_factor"):
        ErrorBudget(0.99, 1000, 0.5)
    with pytest.raises(ValueError, match="max_factor"):
        ErrorBudget(0.99, 1000, float("inf"))
