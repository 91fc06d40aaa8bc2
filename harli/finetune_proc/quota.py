"""Compute quota levels for the finetune process.

A level is ``0..levels``; 0 admits nothing, ``levels`` is the most the finetune may take. The
``QuotaApplier`` interface is what the trainer obeys before each micro-step and, for a new
level, between chunks and blocks; ``CpuQuota`` maps a level to threads, cores and a duty cycle,
``gpu_quota.GpuQuota`` to a green context (an SM partition).
"""

from __future__ import annotations

import os
from typing import Protocol

from harli.cpu_plan import CpuLevels, cpu_levels, set_process_affinity


class QuotaApplier(Protocol):
    levels: int

    def apply(self, level: int) -> None:
        """Configure this process for ``level`` (1..levels): before a micro-step, and inside
        one when the daemon decides a new level."""

    def idle_after(self, level: int, busy_s: float) -> float:
        """Seconds to stay idle after a micro-step that took ``busy_s`` at ``level``."""

    def chunk_scale(self, level: int) -> int:
        """How many times ``finetune.chunk_tokens`` a chunk at ``level`` holds, so that a
        chunk takes about as long at every level (CPU: its threads)."""

    def follow_fence(self) -> bool:
        """Called by the training thread between blocks (``call_between_blocks``): fit what
        this process runs to a fence the daemon put on it since ``apply``. Returns whether it
        changed anything; cheap when nothing changed."""


def openmp_start_mask(spill: frozenset[int]) -> frozenset[int]:
    """Widen this process's CPU mask by ``spill`` (decode's cores) before torch loads, and
    return the mask it had (its own cores), which it narrows back to once torch is loaded.

    libgomp counts the cores it may use once, when it loads, and from then on spins at a
    barrier only briefly (its "throttled" spin, ~1000 iterations) whenever it has more threads
    than that count. Loaded on the finetune's single own core, the top levels' two threads met
    at every op through a futex wake-up and trained slower than one thread: on a 2-core host,
    a LoRA micro-step at 2 threads ran 1598 tok/s started on one core against 3347 started on
    both (1 thread: ~2700 either way)."""
    own = frozenset(os.sched_getaffinity(0))
    if spill - own:
        os.sched_setaffinity(0, own | spill)
    return own - spill


class CpuQuota(CpuLevels):
    """CPU hosts: ``torch.set_num_threads``, the cores those threads may use, and a duty
    cycle (idle between micro-steps), applied to this process."""

    def __init__(self, levels: int, max_threads: int, own_cores: frozenset[int] = frozenset(),
                 spill_cores: frozenset[int] = frozenset()) -> None:
        super().__init__(levels, max_threads, own_cores, spill_cores)
        self._threads: int | None = None

    def apply(self, level: int) -> None:
        import torch

        threads = self.plan(level).threads
        if threads != self._threads:
            torch.set_num_threads(threads)
            self._threads = threads
        cores = self.cores_at(level)
        # Compared with the thread's real mask, not a cache: the daemon may have fenced us.
        if cores and cores != frozenset(os.sched_getaffinity(0)):
            set_process_affinity(cores)

    def follow_fence(self) -> bool:
        """Narrow the OpenMP pool to the cores the daemon's fence left this thread, if it has
        more threads than those: fenced onto one core, two threads of a LoRA chunk trained
        ~290 tok/s against ~3200 for one (see ``block_hooks``). One syscall when the mask
        is unchanged. The next ``apply`` sets the decided level's threads again."""
        threads = self._threads
        if threads is None or threads <= 1:
            return False
        cores = len(os.sched_getaffinity(0))
        if cores >= threads:
            return False
        import torch

        torch.set_num_threads(cores)
        self._threads = cores
        return True

    def idle_after(self, level: int, busy_s: float) -> float:
        duty = self.plan(level).duty
        return busy_s * (1.0 - duty) / duty

    def chunk_scale(self, level: int) -> int:
        # Each thread's share of a chunk stays chunk_tokens: on a 2-core host, 2 threads on
        # 256-token chunks trained 2556 tok/s against 3364 on 512 (3820 unchunked), since the
        # tiny model's ops at 128 tokens a thread are too small to split.
        return self.plan(level).threads


def cpu_quota(levels: int, max_threads: int, allowed: frozenset[int],
              decode_cores: frozenset[int]) -> CpuQuota:
    """This process's CPU quota (``harli.cpu_plan.cpu_levels``, applied here)."""
    plan = cpu_levels(levels, max_threads, allowed, decode_cores)
    return CpuQuota(plan.levels, plan.max_threads, plan.own_cores, plan.spill_cores)
