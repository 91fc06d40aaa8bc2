"""The switchback bookkeeping on synthetic blocks with known answers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harli.bench import blocks as bl
from harli.bench.blocks import Block, Estimate


def block(policy: str, cycle: int, phase: str = "busy", tokens: int = 100, ok: int = 100,
          trained: int = 300, start_s: float = 0.0, duration_s: float = 3.0) -> Block:
    return Block(policy=policy, cycle=cycle, phase=phase, start_s=start_s,
                 end_s=start_s + duration_s, tokens=tokens, tokens_ok=ok,
                 trained_tokens=trained)


def test_every_cycle_holds_every_policy_once_in_a_seeded_order() -> None:
    pols = ["decode-only", "static:1", "static:2", "harli"]
    a = bl.shuffled_cycles(pols, 20, seed=3)
    assert a == bl.shuffled_cycles(pols, 20, seed=3)
    assert all(sorted(c) == sorted(pols) for c in a)
    assert len({tuple(c) for c in a}) > 1  # the order changes between cycles
    assert a != bl.shuffled_cycles(pols, 20, seed=4)


def test_gaps_belong_to_the_window_of_their_second_token() -> None:
    windows = [(1.0, 2.0), (2.5, 3.5)]
    # Gaps ending at 1.2 and 1.9 (0.7 s each: misses) are the first window's; the one ending
    # at 2.2 is in the settling margin; 2.6 (0.4 s, within) the second's; 3.6 after the run.
    counts = bl.count_gaps([[0.5, 1.2, 1.9, 2.2, 2.6, 3.6]], windows, slo_s=0.5)
    assert counts == [(2, 0), (1, 1)]
    assert bl.count_gaps([[1.0, 1.1, 1.2], [0.9, 1.95]], windows, slo_s=0.5) == \
        [(3, 2), (0, 0)]


def test_pooled_figures() -> None:
    bs = [block("a", 0, tokens=100, ok=90, trained=300), block("a", 1, tokens=300, ok=300,
                                                               trained=0)]
    assert bl.attainment(bs) == pytest.approx(390 / 400)
    assert bl.tok_s(bs) == pytest.approx(300 / 6.0)
    assert bl.attainment([]) is None and bl.tok_s([]) is None


def test_level_of() -> None:
    assert [bl.level_of(p) for p in ("decode-only", "static:3", "harli", "static:x")] == \
        [0, 3, None, None]


def test_best_mix_takes_the_fastest_level_per_phase_that_keeps_the_target() -> None:
    w = bl.phase_weights([("quiet", 10.0), ("busy", 30.0)])
    assert w == {"quiet": 0.25, "busy": 0.75}
    bs = []
    for c in range(2):
        bs += [block("decode-only", c, "quiet", trained=0),
               block("static:1", c, "quiet", trained=30),
               block("static:2", c, "quiet", trained=60),  # 20 tok/s, meets in quiet
               block("decode-only", c, "busy", trained=0),
               block("static:1", c, "busy", trained=15),  # 5 tok/s, meets in busy
               block("static:2", c, "busy", ok=90, trained=60)]  # misses 10 % in busy
    assert bl.best_mix_tok_s(bs, w, 0.99) == pytest.approx(0.25 * 20 + 0.75 * 5)


def test_the_mix_spends_the_misses_a_phase_leaves_on_another() -> None:
    # Equal phases and token rates; static:2 misses 1.5 % in busy, meets in quiet: over both
    # phases it keeps 99.25 %, so the mix runs it in both, though busy alone missed 99 %.
    w = {"quiet": 0.5, "busy": 0.5}
    bs = [block("static:1", 0, "quiet", tokens=200, ok=200, trained=30),
          block("static:2", 0, "quiet", tokens=200, ok=200, trained=60),
          block("static:1", 0, "busy", tokens=200, ok=200, trained=15),
          block("static:2", 0, "busy", tokens=200, ok=197, trained=60)]
    assert bl.best_mix_tok_s(bs, w, 0.99) == pytest.approx(20.0)
    assert bl.best_mix_tok_s(bs, w, 0.995) == pytest.approx(0.5 * 20 + 0.5 * 5)
    # Nothing meets a target no level can keep: no mix.
    bad = [block("decode-only", 0, ok=50), block("static:1", 0, ok=50, trained=30)]
    assert bl.best_mix_tok_s(bad, {"busy": 1.0}, 0.99) is None


def test_a_level_with_no_token_in_a_phase_missed_none_there() -> None:
    bs = [block("decode-only", 0, "quiet", tokens=4, ok=4, trained=0),
          block("static:4", 0, "quiet", tokens=0, ok=0, trained=90)]
    assert bl.best_mix_tok_s(bs, {"quiet": 1.0}, 0.99) == pytest.approx(30.0)


@given(st.lists(st.tuples(st.sampled_from(["quiet", "busy"]), st.integers(0, 3),
                          st.integers(0, 50), st.integers(0, 5), st.integers(0, 300)),
                min_size=1, max_size=24))
def test_the_best_mix_trains_at_least_as_much_as_any_level_held_throughout(
        rows: list[tuple[str, int, int, int, int]]) -> None:
    bs = [block("decode-only" if lv == 0 else f"static:{lv}", 0, phase, tokens=n,
                ok=max(0, n - miss), trained=0 if lv == 0 else trained)
          for phase, lv, n, miss, trained in rows]
    phases = {b.phase for b in bs}
    w = {p: 1.0 / len(phases) for p in phases}
    mix = bl.best_mix_tok_s(bs, w, 0.9)
    for policy in {b.policy for b in bs}:
        if any(not bl._by(bs, policy, p) for p in phases):
            continue  # not run in every phase: not a mix of its own
        # Held throughout: its attainment over all phases at each phase's token rate.
        rate = {p: sum(b.tokens for b in bs if b.phase == p) /
                sum(b.duration_s for b in bs if b.phase == p) for p in phases}
        tokens = sum(w[p] * rate[p] for p in phases)
        shares = {p: bl.attainment(bl._by(bs, policy, p)) for p in phases}
        ok = sum(w[p] * rate[p] * (1.0 if shares[p] is None else shares[p])  # type: ignore[operator]
                 for p in phases)
        if tokens <= 0 or ok >= 0.9 * tokens - 1e-9:
            assert mix is not None
            assert mix >= (bl.stratified_tok_s(bs, policy, w) or 0.0) - 1e-9


def test_the_bootstrap_draws_each_phases_cycles_from_that_phase() -> None:
    # Two quiet cycles and four busy ones: every resample keeps that mix, so a figure that
    # depends only on it does not move.
    bs = [block("a", c, "quiet" if c < 2 else "busy") for c in range(6)]

    def quiet_share(sample: object) -> float:
        blocks = list(sample)  # type: ignore[call-overload]
        return sum(b.phase == "quiet" for b in blocks) / len(blocks)

    e = bl.bootstrap(bs, quiet_share, resamples=300)
    assert e.value == e.lo == e.hi == pytest.approx(1 / 3)


def test_bootstrap_of_identical_cycles_has_no_spread_and_of_varied_ones_some() -> None:
    same = [block("a", c, trained=300) for c in range(8)]
    e = bl.bootstrap(same, bl.tok_s, resamples=200)
    assert e.value == e.lo == e.hi == pytest.approx(100.0)
    varied = [block("a", c, trained=300 if c % 2 else 150) for c in range(8)]
    e = bl.bootstrap(varied, bl.tok_s, resamples=500)
    assert e.lo is not None and e.hi is not None
    assert 50 <= e.lo < e.value < e.hi <= 100  # type: ignore[operator]


def test_one_cycle_gives_no_interval() -> None:
    assert bl.bootstrap([block("a", 0)], bl.tok_s) == Estimate(100.0)


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 50), st.integers(0, 50),
                          st.integers(0, 500)), min_size=2, max_size=30))
def test_the_interval_holds_the_point_and_lies_within_the_blocks_range(
        raw: list[tuple[int, int, int, int]]) -> None:
    bs = [block("a", c, tokens=n, ok=min(ok, n), trained=t) for c, n, ok, t in raw]
    e = bl.bootstrap(bs, bl.attainment, resamples=100, seed=1)
    per_cycle = [bl.attainment([b for b in bs if b.cycle == c]) for c in {b.cycle for b in bs}]
    lo, hi = min(x for x in per_cycle if x is not None), max(x for x in per_cycle
                                                             if x is not None)
    if e.lo is not None and e.hi is not None:
        assert lo - 1e-9 <= e.lo <= e.hi <= hi + 1e-9


def _run(harli_trained: int, cycles: int = 10) -> list[Block]:
    bs = []
    for c in range(cycles):
        jitter = 1 + 0.05 * ((c * 7) % 5 - 2)  # the host's drift, shared within a cycle
        for p, trained, ok in (("decode-only", 0, 100), ("static:1", 100, 100),
                               ("static:2", 200, 100), ("static:3", 300, 80),
                               ("harli", harli_trained, 100)):
            bs.append(block(p, c, trained=round(trained * jitter), ok=ok))
    return bs


def test_verdict_names_the_best_static_level_and_the_ratio_with_its_interval() -> None:
    v = bl.verdict(_run(260), {"busy": 1.0}, 0.99, resamples=300)
    assert v.best_static == "static:2" and v.undecided == []
    assert v.ratio.value == pytest.approx(1.3)
    assert v.ratio.lo is not None and v.ratio.hi is not None
    assert v.ratio.lo <= 1.3 <= v.ratio.hi and v.ratio.hi - v.ratio.lo < 0.1
    # The best mix here is static:2 everywhere, so harli's fraction is the same ratio.
    assert v.fraction_of_best_mix.value == pytest.approx(1.3)


def test_verdict_says_which_levels_the_data_cannot_place() -> None:
    bs = _run(200)
    # static:3 meets the target in every cycle but one: 98 % pooled, and the interval
    # straddles 99 % (resamples without that cycle reach 100 %).
    bs = [b if b.policy != "static:3" or b.cycle == 0 else
          Block(**{**b.__dict__, "tokens_ok": 100}) for b in bs]
    v = bl.verdict(bs, {"busy": 1.0}, 0.99, resamples=300)
    assert v.best_static == "static:2" and v.undecided == ["static:3"]


def test_no_static_level_met_gives_no_ratio() -> None:
    bs = [block("static:1", c, ok=50) for c in range(4)] + \
        [block("harli", c) for c in range(4)]
    v = bl.verdict(bs, {"busy": 1.0}, 0.99, resamples=100)
    assert v.best_static is None and v.ratio == Estimate(None)


def test_a_micro_steps_tokens_are_split_by_the_time_it_ran_in_each_window() -> None:
    # Level 2 from t=0; rises of 100 seen at t=1.0 and t=2.0: each micro-step ran for the
    # second before it. Windows [0.5, 1.5) and [1.5, 2.0).
    samples = [(0.0, 0, 2), (0.5, 0, 2), (1.0, 100, 2), (1.5, 100, 2), (2.0, 200, 2)]
    got = bl.trained_in_windows(samples, [(0.5, 1.5), (1.5, 2.0)])
    assert got == pytest.approx([50 + 50, 50])


def test_paused_time_gets_none_of_a_micro_steps_tokens() -> None:
    # Paused (level 0) from 1 to 3: the rise seen at 4 ran in [0, 1) and [3, 4).
    samples = [(0.0, 0, 1), (1.0, 0, 0), (2.0, 0, 0), (3.0, 0, 1), (4.0, 80, 1)]
    got = bl.trained_in_windows(samples, [(0.0, 1.0), (1.0, 3.0), (3.0, 4.0)])
    assert got == pytest.approx([40, 0, 40])


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 4)), min_size=2, max_size=40))
def test_every_trained_token_lands_in_some_window_when_the_windows_cover_the_run(
        steps: list[tuple[int, int]]) -> None:
    samples, tokens = [], 0
    for i, (rise, level) in enumerate(steps):
        tokens += rise
        samples.append((float(i), tokens, level))
    end = float(len(steps))
    got = bl.trained_in_windows(samples, [(0.0, end / 2), (end / 2, end)])
    assert sum(got) == pytest.approx(tokens - steps[0][0])


def test_the_best_static_level_is_the_one_that_trained_most_among_those_that_met() -> None:
    bs = []
    for c in range(6):
        bs += [block("static:2", c, trained=600), block("static:4", c, trained=400),
               block("harli", c, trained=660)]
    v = bl.verdict(bs, {"busy": 1.0}, 0.99, resamples=100)
    assert v.best_static == "static:2" and v.ratio.value == pytest.approx(1.1)
