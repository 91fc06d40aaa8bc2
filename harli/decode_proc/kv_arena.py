"""vLLM's KV cache in the shared arena: the one documented patch point.

vLLM 0.32 allocates the whole KV cache as one ``torch.zeros(size, dtype=int8)`` backing buffer
in ``vllm/v1/worker/utils.py::allocate_kv_cache`` and views every layer into it. That call runs
inside ``kv_cache_allocation_context``, vLLM's own hook for placing the KV cache in a memory pool
(``GPUModelRunner.initialize_kv_cache_tensors``; the CPU runner inherits it). We pass a
``TorchFunctionMode`` there that answers exactly that one ``torch.zeros`` with a zeroed view of
the arena, so every KV tensor is a view into memory the finetune process can map too. The same
hook serves both arenas: a /dev/shm file for a CPU engine, CUDA IPC device memory for a GPU one
(the buffer is taken only when it is asked for on the arena's device).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from harli.arena.shm import Arena, ArenaError

logger = logging.getLogger(__name__)


class ArenaKVAllocation(TorchFunctionMode):
    """Serves the KV backing buffer from ``arena[offset:offset+n]`` (once)."""

    def __init__(self, arena: Arena, offset: int = 0) -> None:
        super().__init__()
        self.arena = arena
        self.offset = offset
        self.nbytes: int | None = None
        self.device_type = "cuda" if arena.handle.kind == "cuda" else "cpu"

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        device = torch.device(kwargs.get("device") or "cpu")
        if (func is torch.zeros and self.nbytes is None and kwargs.get("dtype") is torch.int8
                and len(args) == 1 and isinstance(args[0], int)
                and device.type == self.device_type):
            n = int(args[0])
            if self.offset + n > self.arena.handle.size_bytes:
                knob = ("decode.gpu_memory_utilization" if self.device_type == "cuda"
                        else "decode.kv_cache_gib")
                raise ArenaError(
                    f"vLLM's KV cache needs {n / 2**30:.2f} GiB but the arena holds "
                    f"{(self.arena.handle.size_bytes - self.offset) / 2**30:.2f} GiB; raise "
                    f"memory.arena_gib or lower {knob}")
            buf = self.arena.tensor(self.offset, n, torch.int8)
            buf.zero_()
            self.nbytes = n
            logger.info("[decode] KV cache (%.1f MiB) placed in arena %s at offset %d",
                        n / 2**20, self.arena.handle.name, self.offset)
            return buf
        return func(*args, **kwargs)


@contextlib.contextmanager
def _nested(outer: Any, inner: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if outer is not None:
            stack.enter_context(outer)
        stack.enter_context(inner)
        yield


def install(arena: Arena, offset: int = 0) -> ArenaKVAllocation:
    """Make the next vLLM engine built in this process allocate its KV cache in ``arena``."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    mode = ArenaKVAllocation(arena, offset)
    inner = GPUModelRunner.initialize_kv_cache_tensors

    @functools.wraps(inner)
    def initialize_kv_cache_tensors(self: Any, *args: Any, **kwargs: Any) -> Any:
        # The worker passes its own context (a memory pool on GPU, nullcontext on CPU): ours
        # runs inside it.
        given = kwargs.get("kv_cache_allocation_context")
        kwargs["kv_cache_allocation_context"] = _nested(given, mode)
        return inner(self, *args, **kwargs)

    GPUModelRunner.initialize_kv_cache_tensors = initialize_kv_cache_tensors  # type: ignore[method-assign]
    return mode
