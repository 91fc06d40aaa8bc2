"""Greedy comparison against vLLM's offline outputs: equality, numerical ties, mismatches."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harli.bench.greedy_check import compare_greedy

TIE = 1e-4


def test_identical_outputs_need_no_logprobs() -> None:
    c = compare_greedy([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]], None, TIE)
    assert c.ok and c.identical == 2 and not c.ties


def test_a_swap_within_tie_nats_at_the_first_difference_is_a_tie() -> None:
    ref_lp = [[{1: -0.1}, {2: -1.00000, 7: -1.00003}, {3: -0.5}]]
    c = compare_greedy([[1, 7, 9]], [[1, 2, 3]], ref_lp, TIE)
    assert c.ok and c.identical == 0
    [d] = c.ties
    assert (d.prompt, d.position, d.ours, d.reference) == (0, 1, 7, 2)
    assert d.gap_nats == pytest.approx(3e-5)


def test_a_clear_loser_or_a_token_outside_the_top_k_is_a_mismatch() -> None:
    ref_lp = [[{2: -0.5, 7: -2.0}], [{2: -0.5, 7: -2.0}]]
    c = compare_greedy([[7], [8]], [[2], [2]], ref_lp, TIE)
    assert not c.ok and [d.gap_nats for d in c.mismatches] == [pytest.approx(1.5), None]
    assert "MISMATCHED" in c.summary() and "not in the offline top" in c.summary()


def test_without_logprobs_any_difference_mismatches() -> None:
    assert not compare_greedy([[1, 2]], [[1, 3]], None, TIE).ok


def test_a_truncated_output_mismatches() -> None:
    c = compare_greedy([[1, 2]], [[1, 2, 3]], [[{1: 0.0}, {2: 0.0}, {3: 0.0}]], TIE)
    assert not c.ok and c.mismatches[0].position == 2


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match="1 outputs against 2"):
        compare_greedy([[1]], [[1], [2]], None, TIE)
    with pytest.raises(ValueError, match="tie_nats"):
        compare_greedy([[1]], [[1]], None, -1.0)


@given(st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=8), min_size=1, max_size=6))
def test_equal_outputs_are_always_identical(outs: list[list[int]]) -> None:
    c = compare_greedy(outs, [list(o) for o in outs], None, 0.0)
    assert c.ok and c.identical == len(outs)
