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

    def chunk_scale(self, level: int) -> int:
        """How many times ``finetune.chunk_tokens`` a chunk at ``level`` holds, so that a
        chunk takes about as long at every level (CPU: its threads)."""

    def follow_fence(self) -> bool:
        """Called by the training thread between blocks (``call_between_blocks``): fit what
        this process runs to a fence the daemon put on it since ``apply``. Returns whether it
        changed anything; cheap when nothing changed."""


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


def set_process_affinity(cores: frozenset[int], pid: int | str = "self") -> None:
    """Every thread of process ``pid`` (OpenMP workers included: ``sched_setaffinity(0)``
    moves only the calling thread), so the pool follows the level."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:  # the process is gone
        return
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(int(tid), cores)


def openmp_start_mask(spill: frozenset[int]) -> frozenset[int]:
    """Widen this process's CPU mask by ``spill`` (decode's cores) before torch loads, and
    return the mask it had (its own cores), which it narrows back to once torch is loaded.

    libgomp counts the cores it may use once, when it loads, and from then on spins at a
    barrier only briefly (its "throttled" spin, ~1000 iterations) whenever it has more threads
    than that count. Loaded on the finetune's single own core, the top levels' two threads met
    at every op through a futex wake-up and trained slower than one thread: measured here, a
    LoRA micro-step at 2 threads ran 1598 tok/s started on one core against 3347 started on
    both (1 thread: ~2700 either way)."""
    own = frozenset(os.sched_getaffinity(0))
    if spill - own:
        os.sched_setaffinity(0, own | spill)
    return own - spill


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

    def plan(self, level: int) -> CpuPlan:
        return cpu_plan(level, self.levels, self.max_threads)

    def cores_at(self, level: int) -> frozenset[int]:
        """The cores ``level`` may run on (empty: no pinning configured)."""
        if not (self.own_cores or self.spill_cores):
            return frozenset()
        return cores_for(self.plan(level).threads, self.own_cores, self.spill_cores)

    def dominated_by(self) -> list[int | None]:
        """Per level (index 0..levels), the next higher level that runs the same threads on
        the same cores with a duty cycle at least as long (None: none): it trains at least as
        fast beside any decode, the lower one only idles more (``LevelRates``)."""
        out: list[int | None] = [None] * (self.levels + 1)
        for level in range(1, self.levels):
            plan, cores = self.plan(level), self.cores_at(level)
            for higher in range(level + 1, self.levels + 1):
                other = self.plan(higher)
                if other.threads == plan.threads and self.cores_at(higher) == cores \
                        and other.duty >= plan.duty:
                    out[level] = higher
                    break
        return out

    def fence(self, pid: int, from_level: int, to_level: int) -> bool:
        """Called by the daemon when the level drops: take the finetune's threads off decode's
        cores *now*, as a cgroup cpuset would, instead of at its next micro-step boundary
        (0.1-0.3 s away on CPU, a whole burst of decode iterations). The finetune re-applies
        its level at that boundary. Returns whether the threads were moved."""
        # Paused (0): the micro-step in flight finishes on the lowest level's cores.
        cores = self.cores_at(max(1, to_level))
        if not cores or cores == self.cores_at(max(1, from_level)):
            return False
        set_process_affinity(cores, pid)
        return True

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
        ~290 tok/s here against ~3200 for one (see ``block_hooks``). One syscall when the mask
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
        # Each thread's share of a chunk stays chunk_tokens: measured here, 2 threads on
        # 256-token chunks trained 2556 tok/s against 3364 on 512 (3820 unchunked), since the
        # tiny model's ops at 128 tokens a thread are too small to split.
        return self.plan(level).threads


def cpu_quota(levels: int, max_threads: int, allowed: frozenset[int],
              decode_cores: frozenset[int]) -> CpuQuota:
    """The finetune's CPU quota on this host: it starts on ``allowed`` minus decode's cores,
    and its top levels may spill onto decode's. The finetune obeys it; the daemon builds the
    same one to fence the finetune when the level drops."""
    return CpuQuota(levels, max_threads or len(allowed | decode_cores) or 1,
                    allowed - decode_cores, decode_cores)
