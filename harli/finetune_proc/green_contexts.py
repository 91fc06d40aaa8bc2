"""Green contexts on the GPU: how the finetune's kernels are confined to a quota level's SMs.

A level is entered through a ``LevelTarget``: the stream of a green context (an SM partition)
made the current torch stream, or, on torch < 2.12, the green context itself pushed
(CUDA driver API, Green Contexts). A ``GreenBackend`` makes those targets, through torch's
``torch.cuda.green_contexts`` or, when torch lacks them, cuda-python's driver API wrapped in a
``torch.cuda.ExternalStream``.

Which backend to use, how many SMs each level gets and when to switch are ``gpu_quota.py``'s
(``GpuQuota`` only calls ``full_device``, ``partition``, ``enter`` and ``leave``); this module is
the only one that creates green contexts. torch and cuda-python are imported inside the calls,
so the module imports on a CPU host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from harli.arena.cuda import check_cuda

if TYPE_CHECKING:
    import torch


class GpuQuotaError(RuntimeError):
    """Green contexts could not be set up; the message says why."""


def cuda_driver() -> Any:
    """cuda-python's driver module (``cuda.bindings.driver``, or ``cuda.cuda`` in older
    releases); raises ImportError when cuda-python is not installed."""
    try:
        from cuda.bindings import driver
    except ImportError:
        from cuda import cuda as driver  # type: ignore[attr-defined,no-redef,unused-ignore]
    return driver


class LevelTarget(Protocol):
    sms: int

    def enter(self) -> None:
        """Make this level's partition the one the next kernels launch on."""

    def leave(self) -> None:
        """Undo ``enter`` (before another target enters)."""


class StreamTarget:
    """A stream whose kernels run on a partition (or on the whole device)."""

    def __init__(self, stream: torch.cuda.Stream, sms: int, owner: object = None) -> None:
        self.stream = stream
        self.sms = sms
        self.owner = owner  # the green context the stream belongs to, kept alive

    def enter(self) -> None:
        import torch

        # Work of the previous micro-step was queued on another stream: this one must not
        # overtake it, and blocks freed there may be reused here only after it ran.
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        torch.cuda.set_stream(self.stream)

    def leave(self) -> None:
        pass


class ContextTarget:
    """torch < 2.12: ``GreenContext.set_context()`` pushes the context and switches torch to its
    default stream (after an event wait); ``pop_context()`` goes back."""

    def __init__(self, ctx: Any, sms: int) -> None:
        self.ctx = ctx
        self.sms = sms

    def enter(self) -> None:
        self.ctx.set_context()

    def leave(self) -> None:
        self.ctx.pop_context()


class GreenBackend(Protocol):
    name: str

    def full_device(self) -> LevelTarget: ...

    def partition(self, num_sms: int) -> LevelTarget: ...


class TorchGreenBackend:
    """``torch.cuda.green_contexts.GreenContext`` (beta): ``.Stream()`` from 2.12 on, else
    ``set_context`` / ``pop_context``."""

    name = "torch"

    def __init__(self, device: int, total_sms: int) -> None:
        self.device = device
        self.total_sms = total_sms

    def full_device(self) -> LevelTarget:
        import torch

        return StreamTarget(torch.cuda.current_stream(self.device), self.total_sms)

    def partition(self, num_sms: int) -> LevelTarget:
        from torch.cuda.green_contexts import GreenContext

        ctx = GreenContext.create(num_sms=num_sms, device_id=self.device)
        if hasattr(ctx, "Stream"):
            return StreamTarget(ctx.Stream(), num_sms, owner=ctx)
        return ContextTarget(ctx, num_sms)


class CudaPythonGreenBackend:
    """cuda-python's driver API, for a torch without green contexts: split the device's SM
    resource, build a green context on the group, and wrap a non-blocking stream of it in
    ``torch.cuda.ExternalStream``."""

    name = "cuda-python"

    def __init__(self, device: int, total_sms: int) -> None:
        self.device = device
        self.total_sms = total_sms
        self.drv = cuda_driver()
        self._contexts: list[Any] = []

    def _check(self, result: Any, what: str) -> Any:
        return check_cuda(result, what, GpuQuotaError)

    def full_device(self) -> LevelTarget:
        import torch

        return StreamTarget(torch.cuda.current_stream(self.device), self.total_sms)

    def partition(self, num_sms: int) -> LevelTarget:
        import torch

        drv = self.drv
        torch.empty(1, device=f"cuda:{self.device}")  # the primary context exists first
        dev = self._check(drv.cuDeviceGet(self.device), "cuDeviceGet")
        sm_type = drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
        res = self._check(drv.cuDeviceGetDevResource(dev, sm_type), "cuDeviceGetDevResource")
        groups, n, _rest = self._check(drv.cuDevSmResourceSplitByCount(1, res, 0, num_sms),
                                       f"cuDevSmResourceSplitByCount({num_sms})")
        if int(n) < 1:
            raise GpuQuotaError(f"the driver made no group of {num_sms} SMs")
        desc = self._check(drv.cuDevResourceGenerateDesc([groups[0]], 1),
                           "cuDevResourceGenerateDesc")
        flags = drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
        gctx = self._check(drv.cuGreenCtxCreate(desc, dev, flags), "cuGreenCtxCreate")
        self._contexts.append(gctx)
        # Green-context streams must be non-blocking (driver API reference).
        stream = self._check(drv.cuGreenCtxStreamCreate(
            gctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0), "cuGreenCtxStreamCreate")
        got = self._check(drv.cuGreenCtxGetDevResource(gctx, sm_type), "cuGreenCtxGetDevResource")
        external = torch.cuda.ExternalStream(int(stream), device=self.device)
        return StreamTarget(external, int(got.sm.smCount), owner=stream)


def make_backend(name: str, device: int, total_sms: int) -> GreenBackend:
    """The backend ``probe_green_support`` (gpu_quota.py) named."""
    if name == "torch":
        return TorchGreenBackend(device, total_sms)
    if name == "cuda-python":
        return CudaPythonGreenBackend(device, total_sms)
    raise GpuQuotaError(f"unknown green-context backend {name!r}")
