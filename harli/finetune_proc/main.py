"""``run_finetune_proc``: the finetune process's entry, after ``__main__`` has set up what
must hold before torch loads. It narrows the CPU mask, builds the quota and the lease, and runs
``FinetuneProc`` under ``runtime.run_child`` (signals as stop requests, a fatal error reported
upstream, sockets closed)."""

from __future__ import annotations

import msgspec
import torch

from harli.config import HarliConfig
from harli.cpu_plan import set_process_affinity
from harli.finetune_proc.activations import ActivationLease
from harli.finetune_proc.gpu_quota import make_quota
from harli.finetune_proc.proc import FinetuneProc
from harli.finetune_proc.quota import cpu_quota
from harli.runtime import run_child


def run_finetune_proc(cfg: HarliConfig, incarnation: int, own_cores: frozenset[int],
                      spill_cores: frozenset[int], arena_json: str = "") -> int:
    """Entry of the finetune process (after ``__main__``'s set-up); returns its exit code.
    ``own_cores``: where it trains up to the levels that spill onto decode's ``spill_cores``."""
    # Off decode's cores now that libgomp has read the wide mask (openmp_start_mask).
    if spill_cores and own_cores:
        set_process_affinity(own_cores)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Before anything else touches CUDA: a fallback MPS percentage takes effect only if it is
    # in the environment when the CUDA context is created (start_gpu_quota).
    quota = make_quota(cfg, device, lambda: cpu_quota(
        cfg.finetune.levels, cfg.finetune.max_threads, own_cores, spill_cores))
    lease = None
    if arena_json:
        from harli.arena.cuda import open_arena
        from harli.ipc.arena import ArenaHandle

        handle = msgspec.json.decode(arena_json, type=ArenaHandle)
        # No prefault: the pages are decode's, resident already; only leased ones are touched.
        lease = ActivationLease(open_arena(handle, prefault=False), handle.page_bytes)
    return run_child("finetune", FinetuneProc(cfg, incarnation, quota, lease, device))
