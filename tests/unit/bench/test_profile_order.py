"""``harli profile``'s measuring order (``level_blocks``): every configuration its number of
repeats, and the levels interleaved in blocks so that every level samples the host's drift
alike, instead of level 0 first and alone."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harli.bench.profile import Config, grid, level_blocks

configs = st.lists(st.builds(Config, batch=st.integers(1, 32), context=st.integers(16, 1536),
                             level=st.integers(0, 4)), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(cfgs=configs, repeats=st.integers(1, 3), blocks=st.integers(1, 6), seed=st.integers(0, 9))
def test_every_configuration_runs_its_repeats_in_even_blocks_per_level(
        cfgs: list[Config], repeats: int, blocks: int, seed: int) -> None:
    order = level_blocks(cfgs, repeats, seed, blocks)
    ran = Counter(c for _, todo in order for c in todo)
    assert ran == Counter({c: n * repeats for c, n in Counter(cfgs).items()})
    assert all(todo and all(c.level == level for c in todo) for level, todo in order)
    per_level = Counter(c.level for c in cfgs)
    for level, n in per_level.items():
        sizes = [len(todo) for lv, todo in order if lv == level]
        assert len(sizes) == min(blocks, n * repeats)  # a run per block while there is work
        assert max(sizes) - min(sizes) <= 1


def test_the_quick_grid_interleaves_levels_in_alternating_order() -> None:
    order = level_blocks(grid(quick=True, levels=4), repeats=2, seed=0, blocks=4)
    levels = [lv for lv, _ in order]
    assert levels == [0, 1, 2, 3, 4, 4, 3, 2, 1, 0] * 2
    assert level_blocks(grid(quick=True, levels=4), 2, 0, 4) == order  # seeded
    assert level_blocks(grid(quick=True, levels=4), 2, 1, 4) != order


def test_bad_blocks_or_repeats_are_refused() -> None:
    with pytest.raises(ValueError, match="blocks and repeats"):
        level_blocks(grid(quick=True, levels=4), repeats=2, seed=0, blocks=0)
    with pytest.raises(ValueError, match="blocks and repeats"):
        level_blocks(grid(quick=True, levels=4), repeats=0, seed=0)


@pytest.mark.parametrize("held_out", [False, True])
@pytest.mark.parametrize("quick", [False, True])
def test_with_lora_serving_on_both_stages_measure_batches_naming_adapters(
        quick: bool, held_out: bool) -> None:
    plain = grid(quick, levels=4, held_out=held_out)
    both = grid(quick, levels=4, held_out=held_out, adapters=True)
    assert all(c.mix == "base" for c in plain)
    extra = [c for c in both if c not in plain]
    assert {c.level for c in extra} == {0, 1, 2, 3, 4}
    assert {c.mix for c in extra} <= {"1 adapter", "4 adapters", "half base"}
    # The held-out batches mix base and adapter requests, a mix the fit never measured.
    assert ("half base" in {c.mix for c in extra}) == held_out
    assert len({c.name for c in both}) == len(both)
    with pytest.raises(ValueError, match="unknown mix"):
        Config(1, 16, 0, "all")
