"""The CPU quota plan: what a quota level means on a CPU host, shared by the daemon (which
fences the finetune's threads and skips dominated levels) and the finetune (which applies it).

A level is ``0..levels``; 0 admits nothing, ``levels`` is the most the finetune may take. Level
``l`` maps to (threads, duty cycle, cores): as few threads as carry ``l / levels`` of the
finetune's cores' worth of time, on the finetune's own cores while they suffice, spilling onto
decode's above that.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass


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



class CpuLevels:
    """What each quota level means on a CPU host: threads, the cores they may use and a duty
    cycle. The finetune applies it to itself (``harli.finetune_proc.quota.CpuQuota``); the
    daemon uses it to fence the finetune when the level drops and to skip dominated levels."""

    def __init__(self, levels: int, max_threads: int, own_cores: frozenset[int] = frozenset(),
                 spill_cores: frozenset[int] = frozenset()) -> None:
        if levels < 1 or max_threads < 1:
            raise ValueError("levels and max_threads must be >= 1")
        self.levels = levels
        self.max_threads = max_threads
        self.own_cores = own_cores
        self.spill_cores = spill_cores

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

    def spills(self) -> list[bool]:
        """Per level (index 0..levels), whether it runs threads on decode's cores."""
        return [False, *(bool(self.cores_at(lv) & self.spill_cores)
                         for lv in range(1, self.levels + 1))]

    def fence(self, pid: int, from_level: int, to_level: int) -> bool:
        """Called by the daemon when the level drops: take the finetune's threads off decode's
        cores *now*, as a cgroup cpuset would, instead of at its next micro-step boundary
        (0.1-0.3 s away on CPU, a whole burst of decode iterations). The finetune narrows its
        thread pool to the fence at its model's next block (``CpuQuota.follow_fence``) and
        applies its decided level again before its next micro-step. Returns whether the
        threads were moved."""
        # Paused (0): the micro-step in flight finishes on the lowest level's cores.
        cores = self.cores_at(max(1, to_level))
        if not cores or cores == self.cores_at(max(1, from_level)):
            return False
        set_process_affinity(cores, pid)
        return True


def cpu_levels(levels: int, max_threads: int, allowed: frozenset[int],
               decode_cores: frozenset[int]) -> CpuLevels:
    """The finetune's CPU levels on this host: it starts on ``allowed`` minus decode's cores,
    and its top levels may spill onto decode's."""
    return CpuLevels(levels, max_threads or len(allowed | decode_cores) or 1,
                     allowed - decode_cores, decode_cores)
