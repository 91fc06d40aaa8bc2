"""Wire types for sharing decode's model weights with the finetune process on a GPU host.

The decode process exports each parameter of its vLLM model as (CUDA IPC handle of the
allocation that holds it, byte offset into it, shape, stride, dtype); the finetune process maps
those allocations and builds its HF/PEFT model on views of them instead of loading a second copy
(``harli.finetune_proc.shared_weights``). Internal family, like the children's messages in
``harli.ipc.decode``: ``array_like``, tagged by class name, frozen.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

# The torch dtypes a shared weight may have (names without "torch.").
WEIGHT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "int8", "uint8",
                           "int32", "int64", "float8_e4m3fn", "float8_e5m2"})

NonNegative = Annotated[int, Meta(ge=0)]


class _Internal(msgspec.Struct, tag=True, kw_only=True, array_like=True, frozen=True):
    pass


class WeightExport(_Internal, frozen=True):
    """One parameter of the decode model, as a view of an exported device allocation."""

    name: str  # vLLM's parameter name, e.g. "model.layers.0.self_attn.qkv_proj.weight"
    handle: str  # hex of the cudaIpcMemHandle of the allocation holding the tensor
    alloc_bytes: NonNegative  # size of that allocation (cuMemGetAddressRange)
    offset_bytes: NonNegative  # from the allocation's base to the tensor's first element
    shape: tuple[NonNegative, ...]
    stride: tuple[NonNegative, ...]  # in elements, as torch reports it
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"


class WeightsExported(_Internal, frozen=True):
    """decode -> daemon -> finetune: every parameter of the decode model, once per engine
    start (``generation`` bumps with each decode incarnation; views of an older one are
    invalid once that process is gone). ``exports`` empty: decode could not export them (it
    logs why); the finetune then loads its own copy."""

    generation: int
    model: str  # the model path decode loaded, so the finetune can check it builds the same
    exports: tuple[WeightExport, ...]
