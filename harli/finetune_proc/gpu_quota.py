"""The finetune's compute quota on a GPU: one CUDA green context (an SM partition) per level.

MPS fixes a client's active-thread percentage when the client starts ("configured for a client
process when it starts and cannot be changed for the client process afterwards", NVIDIA's MPS
documentation), so the level cannot be an MPS setting. Instead, at start, this process asks how
many SMs the GPU has and how finely they can be partitioned, pre-creates one green context per
distinct SM count (``sm_counts``) and, before each micro-step, makes the level's stream the
current torch stream (CUDA driver API, Green Contexts). The top level is the whole device: the
ordinary stream of the primary context.

Green contexts confine the finetune; they reserve nothing against decode
(``torch/cuda/green_contexts.py``: "A partition describes a set of SMs; it does not reserve
them against other contexts"). Under MPS they are honoured only while the
client's ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` is unset or 100 (NVIDIA forum 316336).

Fallback (``mode = "mps_percentage"``): when green contexts are unavailable (no torch support
and no cuda-python, an old driver, a percentage already set), or when ``gpu.quota`` asks for it,
the finetune runs under a fixed MPS active-thread percentage set at process start, and the
levels act as a duty cycle only, as on CPU. The mode and its reason are logged and reported
(``describe()``), so status can show which one is in force.

This module decides (which mode, which backend, how many SMs per level) and switches levels;
creating the green contexts and their streams is ``green_contexts.py``'s.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harli.arena.cuda import check_cuda
from harli.finetune_proc.green_contexts import (
    GpuQuotaError,
    GreenBackend,
    LevelTarget,
    cuda_driver,
    make_backend,
)

if TYPE_CHECKING:
    from harli.config import HarliConfig
    from harli.finetune_proc.quota import QuotaApplier

logger = logging.getLogger(__name__)

QUOTA_MODES = ("green_context", "mps_percentage")
MPS_PCT_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
DEFAULT_FALLBACK_PCT = 50

# Green-context partition sizes by compute capability, (minimum SMs, SM count multiple), from
# the CUDA driver API reference of cuDevSmResourceSplitByCount ("On Compute Architecture 6.X:
# the minimum count is 1 SM; 7.X: 2 SMs, a multiple of 2; 8.X: 4 SMs, a multiple of 2; 9.0+:
# 8 SMs, a multiple of 8"). Used only when the driver does not report
# CUdevSmResource.minSmPartitionSize / smCoscheduledAlignment (CUDA < 13).
_DOCUMENTED_PARTITION = {6: (1, 1), 7: (2, 2), 8: (4, 2)}
_DOCUMENTED_PARTITION_SM90 = (8, 8)


# ---------------------------------------------------------------------------------------------
# Partition sizes, level -> SM count, mode choice (pure), and the probes behind them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmPartition:
    """How the device's SMs can be split into green contexts."""

    total_sms: int
    min_sms: int  # smallest partition
    granularity: int  # partition sizes are multiples of this
    source: str  # "driver" (queried) or "documented" (per-architecture table)


def documented_partition(major: int, minor: int, total_sms: int) -> SmPartition:
    """The per-architecture minimum and alignment from the driver API reference."""
    min_sms, gran = _DOCUMENTED_PARTITION.get(major, _DOCUMENTED_PARTITION_SM90)
    if major < 6:
        min_sms, gran = 1, 1
    return SmPartition(total_sms, min_sms, gran, "documented")


def sm_counts(levels: int, total_sms: int, granularity: int, min_sms: int) -> dict[int, int]:
    """SMs given to each quota level ``1..levels``.

    Level ``levels`` is the whole device. A lower level ``l`` gets its proportional share
    ``total_sms * l / levels`` rounded *down* to a multiple of ``granularity`` (a level never
    takes more than its share, which is what the SLO scheduler assumes), but at least the
    smallest partition (``min_sms`` rounded up to the granularity) and at most ``total_sms``.
    The counts are non-decreasing in the level; levels with equal counts share a context.
    """
    for what, v in (("levels", levels), ("total_sms", total_sms),
                    ("granularity", granularity), ("min_sms", min_sms)):
        if v < 1:
            raise ValueError(f"{what} must be >= 1, got {v}")
    smallest = -(-min_sms // granularity) * granularity
    counts = {}
    for level in range(1, levels):
        share = total_sms * level // levels
        aligned = share // granularity * granularity
        counts[level] = min(total_sms, max(smallest, aligned))
    counts[levels] = total_sms
    return counts


@dataclass(frozen=True)
class GreenSupport:
    """What the process can use for green contexts, found without creating any."""

    backend: str | None  # "torch", "cuda-python", or None when neither works
    reason: str  # why not, when backend is None
    mps_active_thread_pct: int | None  # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE at start


def mps_pct_from_env(env: Mapping[str, str]) -> int | None:
    raw = env.get(MPS_PCT_ENV, "").strip()
    if not raw:
        return None
    try:
        return int(float(raw))
    except ValueError:
        logger.warning("[quota] ignoring %s=%r: not a number", MPS_PCT_ENV, raw)
        return None


def choose_mode(requested: str, support: GreenSupport) -> tuple[str, str]:
    """``(mode, reason)``: green contexts when asked for and usable, else the MPS percentage."""
    if requested not in QUOTA_MODES:
        raise ValueError(f"gpu.quota must be one of {QUOTA_MODES}, got {requested!r}")
    if requested == "mps_percentage":
        return "mps_percentage", "gpu.quota = mps_percentage"
    if support.backend is None:
        return "mps_percentage", f"green contexts unavailable: {support.reason}"
    pct = support.mps_active_thread_pct
    if pct is not None and pct < 100:
        return "mps_percentage", (f"{MPS_PCT_ENV}={pct} is set; MPS honours green contexts only "
                                  f"when it is unset or 100")
    return "green_context", f"green contexts via {support.backend}"


def probe_green_support(torch_mod: Any, env: Mapping[str, str],
                        cuda_python: Callable[[], Any] | None = None) -> GreenSupport:
    """Which green-context backend this process has. ``torch_mod`` and ``cuda_python`` (returns
    cuda-python's driver module or raises ImportError) are parameters so tests can fake them."""
    pct = mps_pct_from_env(env)
    if not torch_mod.cuda.is_available():
        return GreenSupport(None, "CUDA is not available", pct)
    if _torch_has_green_contexts(torch_mod):
        return GreenSupport("torch", "", pct)
    try:
        drv = (cuda_python or cuda_driver)()
    except ImportError:
        return GreenSupport(None, "torch has no green-context support and cuda-python is not "
                                  "installed (pip install 'harli[gpu]')", pct)
    version = int(check_cuda(drv.cuDriverGetVersion(), "cuDriverGetVersion", GpuQuotaError))
    if version < 12040:
        cuda = f"{version // 1000}.{version % 1000 // 10}"
        return GreenSupport(None, f"the driver supports CUDA {cuda}; green contexts need 12.4",
                            pct)
    if not hasattr(drv, "cuGreenCtxCreate"):
        return GreenSupport(None, "this cuda-python has no cuGreenCtxCreate", pct)
    return GreenSupport("cuda-python", "", pct)


def _torch_has_green_contexts(torch_mod: Any) -> bool:
    """torch built with ``_CUDAGreenContext`` (``torch.cuda.green_contexts.SUPPORTED``; older
    releases lack the flag, so the class is looked for too)."""
    green = getattr(torch_mod.cuda, "green_contexts", None)
    if green is None:
        try:
            green = importlib.import_module("torch.cuda.green_contexts")
        except ImportError:
            return False
    supported = getattr(green, "SUPPORTED", None)
    if supported is None:
        supported = hasattr(getattr(torch_mod, "_C", None), "_CUDAGreenContext")
    return bool(supported)


def query_partition(device: int, total_sms: int, capability: tuple[int, int]) -> SmPartition:
    """The driver's own figures when it reports them (CUdevSmResource.minSmPartitionSize and
    .smCoscheduledAlignment, CUDA 13 headers), else the documented table."""
    try:
        drv = cuda_driver()
        dev = check_cuda(drv.cuDeviceGet(device), "cuDeviceGet", GpuQuotaError)
        res = check_cuda(drv.cuDeviceGetDevResource(
            dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource",
            GpuQuotaError)
        min_sms = int(getattr(res.sm, "minSmPartitionSize", 0) or 0)
        gran = int(getattr(res.sm, "smCoscheduledAlignment", 0) or 0)
        if min_sms > 0 and gran > 0:
            return SmPartition(total_sms, min_sms, gran, "driver")
    except (ImportError, GpuQuotaError, AttributeError) as e:
        logger.debug("[quota] partition sizes not queried (%s); using the documented ones", e)
    return documented_partition(*capability, total_sms)


# ---------------------------------------------------------------------------------------------
# The applier
# ---------------------------------------------------------------------------------------------


class GpuQuota:
    """``QuotaApplier`` for a GPU: green contexts per level, or an MPS percentage + duty cycle.

    ``start()`` does the CUDA work (query, create contexts); ``apply(level)`` then costs a dict
    lookup and, on a level change, a stream switch.
    """

    def __init__(self, levels: int, device: int = 0, *, requested: str = "green_context",
                 fallback_pct: int | None = DEFAULT_FALLBACK_PCT,
                 backend_factory: Callable[[str, int, int], GreenBackend] | None = None
                 ) -> None:
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if requested not in QUOTA_MODES:
            raise ValueError(f"gpu.quota must be one of {QUOTA_MODES}, got {requested!r}")
        self.levels = levels
        self.device = device
        self.requested = requested
        self.fallback_pct = fallback_pct
        self._backend_factory = backend_factory or make_backend
        self.mode = requested
        self.reason = ""
        self.partition: SmPartition | None = None
        self.sm_counts: dict[int, int] = {}
        self.active_thread_pct: int | None = None
        self._targets: dict[int, LevelTarget] = {}
        self._current: LevelTarget | None = None

    def start(self, support: GreenSupport, partition: SmPartition | None) -> None:
        """Choose the mode and, for green contexts, create one per distinct SM count. Any
        failure to create them falls back to the MPS percentage in force (logged)."""
        self.mode, self.reason = choose_mode(self.requested, support)
        self.active_thread_pct = support.mps_active_thread_pct
        if self.mode == "green_context":
            if partition is None:
                raise ValueError("green contexts need the device's SM partition")
            try:
                self._create_targets(str(support.backend), partition)
            except Exception as e:
                self._targets.clear()
                self.sm_counts, self.partition = {}, None
                self.mode, self.reason = "mps_percentage", f"creating green contexts failed: {e!r}"
        if self.mode == "green_context":
            logger.info("[quota] green contexts on cuda:%d, SMs per level %s (%s; partition "
                        "sizes %s)", self.device, self.sm_counts, self.reason,
                        self.partition.source if self.partition else "?")
        else:
            logger.warning("[quota] no SM partitioning: levels act as a duty cycle only, under "
                           "MPS active-thread percentage %s (%s)",
                           self.active_thread_pct or "unset (100)", self.reason)

    def _create_targets(self, backend_name: str, partition: SmPartition) -> None:
        backend = self._backend_factory(backend_name, self.device, partition.total_sms)
        self.partition = partition
        self.sm_counts = sm_counts(self.levels, partition.total_sms, partition.granularity,
                                   partition.min_sms)
        by_count: dict[int, LevelTarget] = {}
        for level, n in self.sm_counts.items():
            if n not in by_count:
                by_count[n] = (backend.full_device() if n >= partition.total_sms
                               else backend.partition(n))
            self._targets[level] = by_count[n]

    def apply(self, level: int) -> None:
        if not 1 <= level <= self.levels:
            raise ValueError(f"level {level} is outside 1..{self.levels}")
        if self.mode != "green_context":
            return
        target = self._targets[level]
        if target is self._current:
            return
        if self._current is not None:
            self._current.leave()
        target.enter()
        self._current = target

    def idle_after(self, level: int, busy_s: float) -> float:
        if self.mode == "green_context":
            return 0.0  # the partition is the quota
        duty = level / self.levels
        return busy_s * (1.0 - duty) / duty

    def chunk_scale(self, level: int) -> int:
        return 1  # one stream at every level: a chunk's size is not what its SMs share

    def follow_fence(self) -> bool:
        return False  # the daemon fences no GPU finetune: a level takes effect at a chunk

    def describe(self) -> dict[str, Any]:
        """What status shows: the mode in force and why, and the SMs per level."""
        return {"mode": self.mode, "reason": self.reason, "device": self.device,
                "sm_counts": dict(self.sm_counts),
                "active_thread_pct": self.active_thread_pct,
                "fallback_pct": self.fallback_pct,
                "partition_source": self.partition.source if self.partition else None}

    def close(self) -> None:
        """Back on the whole device (the stream the process started with)."""
        top = self._targets.get(self.levels)
        if self._current is not None and top is not None and self._current is not top:
            self._current.leave()
            top.enter()
        self._current = None


def set_mps_percentage_env(pct: int, torch_mod: Any = None,
                           env: dict[str, str] | os._Environ[str] | None = None) -> int | None:
    """Set ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` for this process if CUDA is not initialized
    yet (the limit is read when the client's context is created and never again). Returns the
    percentage in force: an existing setting (the supervisor's) wins."""
    if not 1 <= pct <= 100:
        raise ValueError(f"gpu.fallback_active_thread_pct must be in 1..100, got {pct}")
    env = os.environ if env is None else env
    have = mps_pct_from_env(env)
    if have is not None:
        return have
    if torch_mod is not None and torch_mod.cuda.is_initialized():
        logger.warning("[quota] CUDA is already initialized; %s=%d would not take effect",
                       MPS_PCT_ENV, pct)
        return None
    env[MPS_PCT_ENV] = str(pct)
    return pct


def start_gpu_quota(levels: int, device: int = 0, requested: str = "green_context",
                    fallback_pct: int = DEFAULT_FALLBACK_PCT) -> GpuQuota:
    """Probe, choose and start a ``GpuQuota`` on ``cuda:device``.

    Call it before anything else touches CUDA in the process: when green contexts turn out
    unusable, the fallback percentage can only take effect if it is in the environment before
    the CUDA context exists. (With ``gpu.quota = mps_percentage`` the daemon's MPS control
    already put it there, ``MpsControl.client_env``; an existing setting wins.)
    """
    import torch

    support = GreenSupport(None, "gpu.quota = mps_percentage", mps_pct_from_env(os.environ))
    if requested == "green_context":
        support = probe_green_support(torch, os.environ)
    if choose_mode(requested, support)[0] == "mps_percentage":
        set_mps_percentage_env(fallback_pct, torch)
        support = GreenSupport(support.backend, support.reason, mps_pct_from_env(os.environ))
    quota = GpuQuota(levels, device, requested=requested, fallback_pct=fallback_pct)
    partition = None
    if choose_mode(requested, support)[0] == "green_context":
        props = torch.cuda.get_device_properties(device)
        partition = query_partition(device, int(props.multi_processor_count),
                                    (int(props.major), int(props.minor)))
    quota.start(support, partition)
    return quota


def make_quota(cfg: HarliConfig, device: str,
               cpu_quota: Callable[[], QuotaApplier]) -> QuotaApplier:
    """The finetune's quota applier: ``cpu_quota()`` on a CPU device (``"cpu"``), else a
    started ``GpuQuota`` on ``"cuda[:N]"`` configured by ``[gpu]`` (``quota``,
    ``fallback_active_thread_pct``); see ``start_gpu_quota`` for when to call it."""
    if not device.startswith("cuda"):
        return cpu_quota()
    return start_gpu_quota(cfg.finetune.levels, int(device.partition(":")[2] or 0),
                           cfg.gpu.quota, cfg.gpu.fallback_active_thread_pct)
