"""The demo's score of served answers to the digits task."""

from __future__ import annotations

from harli.cli.demo import _digits_score


def test_digits_right_in_their_place_and_whole_answers() -> None:
    records = [{"output": "9 7 0"}, {"output": "4 2"}, {"output": "1"}]
    assert _digits_score(["9 7", "4 2", " 2 "], records) == (4 / 6, 1)  # 2 + 2 + 0 of 6
    assert _digits_score([" 9 7 0\n", "4 2 5", "1"], records) == (6 / 6, 2)
    assert _digits_score(["", "", ""], records) == (0.0, 0)
