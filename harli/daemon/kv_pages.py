"""Which arena pages each group of vLLM KV blocks covers (pure, for the daemon).

vLLM lays its KV cache out per layer, block-major (``KVLayout``: block ``b`` of layer ``l`` is
``[offset_l + b * block_bytes, + block_bytes)``), so one block's bytes are spread over every
layer. The unit that can be lent is therefore a *group* of ``blocks_per_group`` consecutive,
aligned blocks: just enough that its byte range in each layer is a whole number of pages. A
group lent by decode means those pages, in every layer, are free for the finetune; a page that
holds bytes of any block not in one group is never lent.
"""

from __future__ import annotations

import math

from harli.ipc.decode import KVLayout


def blocks_per_group(block_bytes: int, page_bytes: int) -> int:
    """The fewest consecutive blocks whose bytes are a whole number of pages."""
    if block_bytes < 1 or page_bytes < 1:
        raise ValueError(f"block_bytes and page_bytes must be >= 1, got {block_bytes}, "
                         f"{page_bytes}")
    return math.lcm(block_bytes, page_bytes) // block_bytes


class KVPageMap:
    def __init__(self, layout: KVLayout, page_bytes: int, num_pages: int) -> None:
        self.layout = layout
        self.page_bytes = page_bytes
        self.blocks_per_group = blocks_per_group(layout.block_bytes, page_bytes)
        self.num_groups = layout.num_blocks // self.blocks_per_group
        span = layout.num_blocks * layout.block_bytes
        arena_bytes = num_pages * page_bytes
        if any(o < 0 or o + span > arena_bytes for o in layout.layer_offsets_bytes):
            raise ValueError(f"the KV layout ({len(layout.layer_offsets_bytes)} layers of "
                             f"{span} bytes) does not fit the arena of {arena_bytes} bytes")
        kv: set[int] = set()
        for off in layout.layer_offsets_bytes:
            kv.update(range(off // page_bytes, -(-(off + span) // page_bytes)))
        self.kv_pages: tuple[int, ...] = tuple(sorted(kv))
        group_bytes = self.blocks_per_group * layout.block_bytes
        self._group_pages: list[tuple[int, ...]] = []
        owner: dict[int, int] = {}
        for g in range(self.num_groups):
            pages: list[int] = []
            for off in layout.layer_offsets_bytes:
                start, end = off + g * group_bytes, off + (g + 1) * group_bytes
                # Only pages wholly inside the group's range: an edge page shared with a
                # neighbouring group (unaligned layer offset) stays with decode.
                pages.extend(range(-(-start // page_bytes), end // page_bytes))
            for p in pages:
                if p in owner:
                    raise ValueError(f"page {p} would belong to KV groups {owner[p]} and {g}: "
                                     f"the layers overlap")
                owner[p] = g
            self._group_pages.append(tuple(pages))

    def pages_of(self, group: int) -> tuple[int, ...]:
        if not 0 <= group < self.num_groups:
            raise ValueError(f"KV block group {group} outside 0..{self.num_groups - 1}")
        return self._group_pages[group]
