"""The KV lending policy: how many of decode's free KV blocks the finetune may borrow.

Pure logic for the daemon's ``MemoryManager`` (no torch, no ZMQ): decode keeps free at least
the larger of a configured floor and the KV demand predicted over a horizon; the rest is lent;
when the free count falls under that mark, the deficit is reclaimed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LendPlan:
    lend: int  # free blocks that may be lent now
    reclaim: int  # lent blocks to ask back now
    mark: int  # free blocks decode must keep


def plan_lending(free: int, leased: int, floor: int, predicted_demand: int) -> LendPlan:
    """Keep at least ``max(floor, predicted_demand)`` blocks free for decode; lend the rest;
    reclaim what is missing when free blocks fall under that mark."""
    if min(free, leased, floor, predicted_demand) < 0:
        raise ValueError("block counts must be >= 0")
    mark = max(floor, predicted_demand)
    if free > mark:
        return LendPlan(lend=free - mark, reclaim=0, mark=mark)
    return LendPlan(lend=0, reclaim=min(leased, mark - free), mark=mark)


def kv_demand_blocks(num_running: int, num_waiting: int, waiting_tokens: int,
                     horizon_iters: int, block_size: int) -> int:
    """New KV blocks decode may need within ``horizon_iters`` iterations: every running
    request grows by one token per iteration (a new block each ``block_size`` tokens; we
    cannot see where in its last block it is, so count the worst case), and every waiting
    request needs blocks for its prompt plus its first new token."""
    if min(num_running, num_waiting, waiting_tokens, horizon_iters) < 0 or block_size < 1:
        raise ValueError("counts must be >= 0 and block_size >= 1")
    growth = num_running * math.ceil(horizon_iters / block_size) if horizon_iters else 0
    return growth + math.ceil(waiting_tokens / block_size) + num_waiting
