"""Compute quota levels for the finetune process.

A level is ``0..levels``; 0 admits nothing, ``levels`` is the most the finetune may take. The
``QuotaApplier`` interface is what the trainer obeys before each micro-step; the CPU one maps a
level to (threads, duty cycle), the GPU one (green contexts) comes with the GPU backend.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Protocol


class QuotaApplier(Protocol):
    levels: int

    def apply(self, level: int) -> None:
        """Configure this process for ``level`` before a micro-step (1..levels)."""

    def idle_after(self, level: int, busy_s: float) -> float:
        """Seconds to stay idle after a micro-step that took ``busy_s`` at ``level``."""


@dataclass(frozen=True)
class CpuPlan:
    threads: int
    duty: float  # share of wall time spent computing, (0, 1]


def cpu_plan(level: int, levels: int, max_threads: int) -> CpuPlan:
    """Level ``l`` gets ``l / levels`` of ``max_threads`` cores' worth of time: as few threads
    as can carry that share, run for the matching share of wall time."""
    if not 1 <= level <= levels:
        raise ValueError(f"level {level} is outside 1..{levels}")
    cores = max_threads * level / levels
    threads = max(1, math.ceil(cores - 1e-9))
    return CpuPlan(threads=threads, duty=min(1.0, cores / threads))


def cores_for(threads: int, own: frozenset[int], spill: frozenset[int]) -> frozenset[int]:
    """The cores a level's threads may run on: the finetune's own (the cores decode does not
    use) while they suffice, else also decode's (``spill``). Spilling is what makes a high
    level interfere with decode, as a GPU finetune's SMs compete with decode's kernels: the
    levels above the finetune's own share are the ones the SLO scheduler has to ration."""
    if not own or threads > len(own):
        return own | spill
    return own


def set_process_affinity(cores: frozenset[int]) -> None:
    """Every thread of this process (OpenMP workers included: ``sched_setaffinity(0)`` moves
    only the calling thread), so the pool follows the level."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(int(tid), cores)


class CpuQuota:
    """CPU hosts: ``torch.set_num_threads``, the cores those threads may use, and a duty
    cycle (idle between micro-steps)."""

    def __init__(self, levels: int, max_threads: int, own_cores: frozenset[int] = frozenset(),
                 spill_cores: frozenset[int] = frozenset()) -> None:
        if levels < 1 or max_threads < 1:
            raise ValueError("levels and max_threads must be >= 1")
        self.levels = levels
        self.max_threads = max_threads
        self.own_cores = own_cores
        self.spill_cores = spill_cores
        self._threads: int | None = None
        self._cores: frozenset[int] | None = None

    def plan(self, level: int) -> CpuPlan:
        return cpu_plan(level, self.levels, self.max_threads)

    def apply(self, level: int) -> None:
        import torch

        threads = self.plan(level).threads
        if threads != self._threads:
            torch.set_num_threads(threads)
            self._threads = threads
        if self.own_cores or self.spill_cores:
            cores = cores_for(threads, self.own_cores, self.spill_cores)
            if cores != self._cores:
                set_process_affinity(cores)
                self._cores = cores

    def idle_after(self, level: int, busy_s: float) -> float:
        duty = self.plan(level).duty
        return busy_s * (1.0 - duty) / duty
