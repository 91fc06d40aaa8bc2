"""Compute quota levels for the finetune process.

A level is ``0..levels``; 0 admits nothing, ``levels`` is the most the finetune may take. The
``QuotaApplier`` interface is what the trainer obeys before each micro-step; the CPU one maps a
level to (threads, duty cycle), the GPU one (green contexts) comes with the GPU backend.
"""

from __future__ import annotations

import math
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


class CpuQuota:
    """CPU hosts: ``torch.set_num_threads`` and a duty cycle (idle between micro-steps)."""

    def __init__(self, levels: int, max_threads: int) -> None:
        if levels < 1 or max_threads < 1:
            raise ValueError("levels and max_threads must be >= 1")
        self.levels = levels
        self.max_threads = max_threads
        self._threads: int | None = None

    def plan(self, level: int) -> CpuPlan:
        return cpu_plan(level, self.levels, self.max_threads)

    def apply(self, level: int) -> None:
        import torch

        threads = self.plan(level).threads
        if threads != self._threads:
            torch.set_num_threads(threads)
            self._threads = threads

    def idle_after(self, level: int, busy_s: float) -> float:
        duty = self.plan(level).duty
        return busy_s * (1.0 - duty) / duty
