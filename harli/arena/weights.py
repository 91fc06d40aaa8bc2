"""Decode's weights shared with the finetune through CUDA IPC, as views of their allocations.

The decode process exports each parameter of its vLLM model (``export_weights``: CUDA IPC
handle of the allocation holding it, offset, shape, stride, dtype; wire types in
``harli.ipc.weights``); the finetune maps them (``import_weights``) and binds its HF model's
parameters to the views (``harli.finetune_proc.shared_weights``). Both halves live here, since
an import in the exporting process must reuse the exporter's own mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from harli.arena.cuda import (
    CudaRuntime,
    DeviceMapping,
    decode_ipc_handle,
    default_runtime,
    encode_ipc_handle,
)
from harli.ipc.weights import WEIGHT_DTYPES, WeightExport

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class WeightShareError(ValueError):
    """Decode's weights cannot back the finetune's model; the message says which and why."""




def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def span_bytes(shape: Sequence[int], stride: Sequence[int], itemsize: int) -> int:
    """Bytes from a strided tensor's first element to the end of its last one."""
    if len(shape) != len(stride):
        raise WeightShareError(f"shape {tuple(shape)} and stride {tuple(stride)} differ in rank")
    if any(s == 0 for s in shape):
        return 0
    return (sum((n - 1) * st for n, st in zip(shape, stride, strict=True)) + 1) * itemsize


def _itemsize(dtype: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def validate_export(e: WeightExport) -> None:
    """What an importer checks before it maps anything: a well-formed handle, a known dtype, and
    a tensor that lies inside its allocation at an aligned offset."""
    decode_ipc_handle(e.handle)
    if e.dtype not in WEIGHT_DTYPES:
        raise WeightShareError(f"{e.name}: dtype {e.dtype!r} cannot be shared")
    itemsize = _itemsize(e.dtype)
    end = e.offset_bytes + span_bytes(e.shape, e.stride, itemsize)
    if end > e.alloc_bytes:
        raise WeightShareError(f"{e.name}: bytes [{e.offset_bytes}, {end}) outside its "
                               f"allocation of {e.alloc_bytes} bytes")
    if e.offset_bytes % itemsize:
        raise WeightShareError(f"{e.name}: offset {e.offset_bytes} is not aligned to {e.dtype}")


# Allocations this process exported, handle -> (base, size, device): a handle cannot be opened
# in its own process, so an import here views the memory directly.
_EXPORTED_HERE: dict[str, tuple[int, int, int]] = {}


def export_weights(named_params: Iterable[tuple[str, torch.Tensor]],
                   runtime: CudaRuntime | None = None) -> list[WeightExport]:
    """Describe each CUDA tensor as a view of its (exported) allocation. The tensors must stay
    alive, and unmoved, as long as any importer uses them.

    torch's caching allocator must hand out ordinary ``cudaMalloc`` segments: with
    ``expandable_segments`` the memory is VMM-mapped and ``cudaIpcGetMemHandle`` refuses it.
    """
    rt = runtime or default_runtime()
    ranges: list[tuple[int, int, str]] = []  # (base, size, handle) of allocations seen
    exports: list[WeightExport] = []
    for name, t in named_params:
        if t.device.type != "cuda":
            raise WeightShareError(f"{name} is on {t.device}, not a CUDA device")
        ptr = int(t.data_ptr())
        hit = next((r for r in ranges if r[0] <= ptr < r[0] + r[1]), None)
        if hit is None:
            base, size = rt.address_range(ptr)
            try:
                handle = encode_ipc_handle(rt.ipc_get_handle(base))
            except Exception as err:
                raise WeightShareError(
                    f"{name}: cannot export its allocation ({err}); run decode with "
                    f"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False") from None
            _EXPORTED_HERE[handle] = (base, size, t.device.index or 0)
            hit = (base, size, handle)
            ranges.append(hit)
        base, size, handle = hit
        e = WeightExport(name=name, handle=handle, alloc_bytes=size, offset_bytes=ptr - base,
                         shape=tuple(t.shape), stride=tuple(t.stride()),
                         dtype=dtype_name(t.dtype))
        validate_export(e)
        exports.append(e)
    return exports


def import_weights(exports: Iterable[WeightExport], device: int | None = None,
                   runtime: CudaRuntime | None = None) -> dict[str, torch.Tensor]:
    """Map the exported allocations (each once) and return the tensors by name. The mappings
    close when the last tensor viewing them goes."""
    import torch

    rt = runtime or default_runtime()
    exports = list(exports)
    for e in exports:
        validate_export(e)
    dev = rt.current_device() if device is None else device
    mappings: dict[str, DeviceMapping] = {}
    out: dict[str, torch.Tensor] = {}
    for e in exports:
        m = mappings.get(e.handle)
        if m is None:
            here = _EXPORTED_HERE.get(e.handle)
            if here is not None:
                m = DeviceMapping(rt, here[0], here[1], here[2], kind="borrowed")
            else:
                m = DeviceMapping(rt, rt.ipc_open_handle(decode_ipc_handle(e.handle), dev),
                                  e.alloc_bytes, dev, kind="ipc")
            mappings[e.handle] = m
        dtype = getattr(torch, e.dtype)
        n = span_bytes(e.shape, e.stride, _itemsize(e.dtype))
        flat = m.tensor(e.offset_bytes, n).view(dtype)
        out[e.name] = flat.as_strided(e.shape, e.stride)
    logger.info("[finetune] mapped %d shared weights from %d allocations", len(out),
                len(mappings))
    return out
