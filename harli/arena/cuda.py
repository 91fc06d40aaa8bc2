"""The GPU arena: device memory shared by a legacy CUDA IPC handle (the ``Arena`` protocol).

The daemon (or whoever owns the arena) ``cudaMalloc``s one region and exports it with
``cudaIpcGetMemHandle``; the 64-byte handle travels hex-encoded in ``ArenaHandle.name``
(``kind="cuda"``) over ZMQ like the CPU arena's path. A child maps it with
``cudaIpcOpenMemHandle(..., cudaIpcMemLazyEnablePeerAccess)``. Tensors are zero-copy views
built from the raw device pointer through ``__cuda_array_interface__``; the small holder object
that torch keeps referenced (``Py_INCREF`` in ``tensor_from_cuda_array_interface``) keeps the
mapping alive, so, as with ``ShmArena``, ``close()`` drops the arena's own reference and the
memory goes when the last view does.

Rules of legacy CUDA IPC that shape this module (``docs/gpu.md``):

* a handle covers one whole ``cudaMalloc`` allocation, so the arena's size is a multiple of
  2 MiB (smaller allocations may be sub-allocated from a block, and IPC shares the block);
* a handle cannot be opened in the process that exported it (``invalid device context``), so
  ``attach()`` in the exporting process reuses the exporter's own mapping;
* the exporter must outlive its importers: ``cudaFree`` before the importers'
  ``cudaIpcCloseMemHandle`` is undefined behaviour. The daemon owns the arena and stops the
  children before it closes it.

cuda-python (the ``gpu`` extra) is imported lazily, inside ``CudaPythonRuntime``, so this module
imports on CPU hosts. Everything the arena asks of CUDA goes through a ``CudaRuntime`` object,
which unit tests replace with a fake over host memory.
"""

from __future__ import annotations

import functools
import logging
import string
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from harli.arena.shm import DEFAULT_PAGE_BYTES, Arena, ArenaError, ShmArena
from harli.ipc.arena import ArenaHandle

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IPC_HANDLE_BYTES = 64  # CU_IPC_HANDLE_SIZE
IPC_ALIGN_BYTES = 2 << 20  # share only 2 MiB-aligned sizes (CUDA programming guide, IPC)
_HEX = frozenset(string.hexdigits)


# ---------------------------------------------------------------------------------------------
# Pure helpers: handle encoding, range checks, CUDA error results
# ---------------------------------------------------------------------------------------------


def encode_ipc_handle(raw: bytes) -> str:
    """The 64 bytes of a ``cudaIpcMemHandle_t`` as lowercase hex (128 characters)."""
    if len(raw) != IPC_HANDLE_BYTES:
        raise ArenaError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(raw)}")
    return raw.hex()


def decode_ipc_handle(text: str) -> bytes:
    """Inverse of ``encode_ipc_handle``; says what is wrong with a malformed handle."""
    if len(text) != 2 * IPC_HANDLE_BYTES:
        raise ArenaError(f"a CUDA IPC handle is {2 * IPC_HANDLE_BYTES} hex characters "
                         f"({IPC_HANDLE_BYTES} bytes), got {len(text)} characters")
    bad = sorted(set(text) - _HEX)
    if bad:
        raise ArenaError(f"a CUDA IPC handle must be hex; found {''.join(bad)!r}")
    return bytes.fromhex(text)


def handle_bytes(reserved: Any) -> bytes:
    """``cudaIpcMemHandle_t.reserved`` as bytes: cuda-bindings returns ``bytes``, some versions
    a list of (signed) chars."""
    if isinstance(reserved, bytes | bytearray):
        return bytes(reserved)
    return bytes(int(c) & 0xFF for c in reserved)


def check_view_range(size_bytes: int, offset: int, nbytes: int, itemsize: int,
                     dtype_name: str) -> None:
    """The checks ``ShmArena.tensor`` makes, with the same messages: the range lies inside the
    arena and both ends are aligned to the element size."""
    if offset < 0 or nbytes < 0 or offset + nbytes > size_bytes:
        raise ArenaError(f"range [{offset}, {offset + nbytes}) outside the arena of "
                         f"{size_bytes} bytes")
    if nbytes % itemsize or offset % itemsize:
        raise ArenaError(f"range [{offset}, {offset + nbytes}) is not aligned to {dtype_name}")


def check_arena_size(size_bytes: int, page_bytes: int) -> None:
    if page_bytes <= 0:
        raise ArenaError(f"memory.page_bytes must be positive, got {page_bytes}")
    if size_bytes < page_bytes or size_bytes % page_bytes:
        raise ArenaError(f"arena size {size_bytes} must be a positive multiple of the page "
                         f"size {page_bytes}")
    if size_bytes % IPC_ALIGN_BYTES:
        # A smaller cudaMalloc may be carved out of a larger block, and IPC would share the
        # whole block with the other process.
        raise ArenaError(f"a CUDA arena's size must be a multiple of 2 MiB (CUDA IPC shares "
                         f"whole allocations), got {size_bytes}")


def cuda_error_name(err: Any) -> str:
    """``cudaErrorInvalidValue`` / ``CUDA_ERROR_INVALID_VALUE`` for an error enum member."""
    name = getattr(err, "name", None)
    return str(name) if name else f"CUDA error {int(err)}"


def check_cuda(result: Any, what: str, error: type[Exception] = ArenaError) -> Any:
    """Unpack a cuda-python result tuple ``(err, *values)``: the value (or a tuple of them, or
    None), or ``error`` (default ``ArenaError``) naming the call and the CUDA error."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if int(err) != 0:
        raise error(f"{what} failed: {cuda_error_name(err)} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# ---------------------------------------------------------------------------------------------
# The CUDA calls the arena (and harli.finetune_proc.shared_weights) makes
# ---------------------------------------------------------------------------------------------


class CudaRuntime(Protocol):
    def current_device(self) -> int: ...

    def malloc(self, nbytes: int, device: int) -> int: ...

    def free(self, ptr: int) -> None: ...

    def memset(self, ptr: int, value: int, nbytes: int) -> None: ...

    def ipc_get_handle(self, ptr: int) -> bytes: ...

    def ipc_open_handle(self, raw: bytes, device: int) -> int: ...

    def ipc_close_handle(self, ptr: int) -> None: ...

    def address_range(self, ptr: int) -> tuple[int, int]: ...

    def tensor(self, ptr: int, nbytes: int, owner: object, device: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` at ``ptr`` that keeps ``owner`` referenced."""
        ...


def _import_cuda_python() -> tuple[Any, Any]:
    """``(runtime, driver)`` modules of cuda-python, whichever layout is installed."""
    try:
        from cuda.bindings import driver, runtime

        return runtime, driver
    except ImportError:
        pass
    try:  # cuda-python < 12.6
        from cuda import cuda as driver  # type: ignore[attr-defined,no-redef,unused-ignore]
        from cuda import cudart  # type: ignore[attr-defined,unused-ignore]

        return cudart, driver
    except ImportError:
        raise ArenaError("CUDA arenas need cuda-python: pip install 'harli[gpu]'") from None


class _CudaArrayInterface:
    """The smallest object torch turns into a CUDA tensor without copying; torch keeps it
    referenced for the tensor's life, and it keeps ``owner`` (the mapping) alive."""

    def __init__(self, ptr: int, nbytes: int, owner: object) -> None:
        self.owner = owner
        # No "stream" key: the memory is not produced on any stream torch should wait for.
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "strides": None, "version": 3}


class CudaPythonRuntime:
    """``CudaRuntime`` over cuda-python's runtime (and, for address ranges, driver) API."""

    def __init__(self) -> None:
        self.rt, self.drv = _import_cuda_python()

    def current_device(self) -> int:
        return int(check_cuda(self.rt.cudaGetDevice(), "cudaGetDevice"))

    def malloc(self, nbytes: int, device: int) -> int:
        check_cuda(self.rt.cudaSetDevice(device), f"cudaSetDevice({device})")
        return int(check_cuda(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        check_cuda(self.rt.cudaFree(ptr), "cudaFree")

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        check_cuda(self.rt.cudaMemset(ptr, value, nbytes), "cudaMemset")
        # cudaMemset may return before the memory is written; an importer must not see the
        # old contents.
        check_cuda(self.rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def ipc_get_handle(self, ptr: int) -> bytes:
        handle = check_cuda(self.rt.cudaIpcGetMemHandle(ptr), "cudaIpcGetMemHandle")
        return handle_bytes(handle.reserved)

    def ipc_open_handle(self, raw: bytes, device: int) -> int:
        check_cuda(self.rt.cudaSetDevice(device), f"cudaSetDevice({device})")
        handle = self.rt.cudaIpcMemHandle_t()
        handle.reserved = raw
        flags = self.rt.cudaIpcMemLazyEnablePeerAccess
        return int(check_cuda(self.rt.cudaIpcOpenMemHandle(handle, flags),
                              "cudaIpcOpenMemHandle"))

    def ipc_close_handle(self, ptr: int) -> None:
        check_cuda(self.rt.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")

    def address_range(self, ptr: int) -> tuple[int, int]:
        # The driver call needs a current context; the runtime call makes the primary one
        # current (torch uses the same primary context).
        check_cuda(self.rt.cudaFree(0), "cudaFree(0)")
        base, size = check_cuda(self.drv.cuMemGetAddressRange(ptr), "cuMemGetAddressRange")
        return int(base), int(size)

    def tensor(self, ptr: int, nbytes: int, owner: object, device: int) -> torch.Tensor:
        import torch

        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}")
        return torch.as_tensor(_CudaArrayInterface(ptr, nbytes, owner),
                               device=f"cuda:{device}")


@functools.cache
def default_runtime() -> CudaRuntime:
    return CudaPythonRuntime()


# ---------------------------------------------------------------------------------------------
# Mappings and the arena
# ---------------------------------------------------------------------------------------------


MAPPING_KINDS = ("malloc", "ipc", "borrowed")


def _release(runtime: CudaRuntime, ptr: int, kind: str) -> None:
    try:
        if kind == "ipc":
            runtime.ipc_close_handle(ptr)
        elif kind == "malloc":
            runtime.free(ptr)
    except ArenaError as e:
        logger.warning("[arena] releasing device memory at %#x: %s", ptr, e)


class DeviceMapping:
    """Device memory this process owns (``malloc``: ``cudaMalloc``), mapped (``ipc``:
    ``cudaIpcOpenMemHandle``) or only views (``borrowed``: memory torch allocated, which this
    process exported; nothing to release).

    Released once, when the last reference goes (the arena, a tensor view's holder) or on
    ``release()``. Not at interpreter exit: the driver reclaims everything then, and CUDA
    may already be torn down.
    """

    def __init__(self, runtime: CudaRuntime, ptr: int, size_bytes: int, device: int,
                 kind: str) -> None:
        if kind not in MAPPING_KINDS:
            raise ValueError(f"mapping kind must be one of {MAPPING_KINDS}, got {kind!r}")
        self.runtime = runtime
        self.ptr = ptr
        self.size_bytes = size_bytes
        self.device = device
        self.kind = kind
        self._finalizer = weakref.finalize(self, _release, runtime, ptr, kind)
        self._finalizer.atexit = False

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def release(self) -> None:
        self._finalizer()

    def tensor(self, offset: int, nbytes: int) -> torch.Tensor:
        """uint8 view of ``[offset, offset + nbytes)``; keeps this mapping alive."""
        if not self.alive:
            raise ArenaError(f"device memory at {self.ptr:#x} was already released")
        return self.runtime.tensor(self.ptr + offset, nbytes, self, self.device)


# Handles exported by this process -> their mapping: opening one's own handle fails, so a
# same-process attach reuses the exporter's mapping instead.
_LOCAL_EXPORTS: weakref.WeakValueDictionary[str, DeviceMapping] = weakref.WeakValueDictionary()


def local_export(handle_hex: str) -> DeviceMapping | None:
    return _LOCAL_EXPORTS.get(handle_hex)


def register_local_export(handle_hex: str, mapping: DeviceMapping) -> None:
    _LOCAL_EXPORTS[handle_hex] = mapping


class CudaArena:
    """GPU arena: one ``cudaMalloc`` region, shared by its CUDA IPC handle."""

    def __init__(self, handle: ArenaHandle, mapping: DeviceMapping, owner: bool) -> None:
        self.handle = handle
        self.owner = owner
        self.device = mapping.device
        self._mapping: DeviceMapping | None = mapping
        self._base = mapping.ptr

    @classmethod
    def create(cls, size_bytes: int, page_bytes: int = DEFAULT_PAGE_BYTES,
               generation: int = 1, device: int | None = None,
               runtime: CudaRuntime | None = None) -> CudaArena:
        """Allocate and zero ``size_bytes`` of device memory and export it."""
        check_arena_size(size_bytes, page_bytes)
        rt = runtime or default_runtime()
        dev = rt.current_device() if device is None else device
        try:
            ptr = rt.malloc(size_bytes, dev)
        except ArenaError as e:
            raise ArenaError(f"{e}: an arena of {size_bytes / 2**30:.2f} GiB does not fit on "
                             f"cuda:{dev}; lower memory.arena_gib") from None
        mapping = DeviceMapping(rt, ptr, size_bytes, dev, kind="malloc")
        rt.memset(ptr, 0, size_bytes)  # zeroed, like a fresh /dev/shm file
        name = encode_ipc_handle(rt.ipc_get_handle(ptr))
        register_local_export(name, mapping)
        handle = ArenaHandle(kind="cuda", name=name, size_bytes=size_bytes,
                             page_bytes=page_bytes, generation=generation)
        logger.info("[arena] %.1f MiB of device memory on cuda:%d exported by CUDA IPC",
                    size_bytes / 2**20, dev)
        return cls(handle, mapping, owner=True)

    @classmethod
    def attach(cls, handle: ArenaHandle, device: int | None = None,
               runtime: CudaRuntime | None = None) -> CudaArena:
        """Map an arena that another process created (or reuse this process's own)."""
        if handle.kind != "cuda":
            raise ArenaError(f"cannot attach a {handle.kind!r} arena as a CUDA arena")
        raw = decode_ipc_handle(handle.name)
        check_arena_size(handle.size_bytes, handle.page_bytes)
        local = local_export(handle.name)
        if local is not None and local.alive:
            return cls(handle, local, owner=False)
        rt = runtime or default_runtime()
        dev = rt.current_device() if device is None else device
        try:
            ptr = rt.ipc_open_handle(raw, dev)
        except ArenaError as e:
            raise ArenaError(f"{e}: cannot map the CUDA arena (generation {handle.generation});"
                             f" is its creator still running, on the same GPU, and (under "
                             f"MPS) a client of the same MPS server?") from None
        return cls(handle, DeviceMapping(rt, ptr, handle.size_bytes, dev, kind="ipc"),
                   owner=False)

    @property
    def base_address(self) -> int:
        """Device address of byte 0 in this process (to find where a tensor lies in it)."""
        return self._base

    def tensor(self, offset: int, nbytes: int, dtype: Any = None) -> torch.Tensor:
        import torch

        dtype = dtype or torch.uint8
        itemsize = torch.empty((), dtype=dtype).element_size()
        check_view_range(self.handle.size_bytes, offset, nbytes, itemsize, str(dtype))
        if self._mapping is None:
            raise ArenaError("the CUDA arena is closed")
        return self._mapping.tensor(offset, nbytes).view(dtype)

    def close(self) -> None:
        # Views may still use the memory: it is freed (or unmapped) when the last one goes.
        self._mapping = None


def open_arena(handle: ArenaHandle, *, prefault: bool = True, device: int | None = None,
               runtime: CudaRuntime | None = None) -> Arena:
    """Attach whichever arena the handle names: ``shm`` (CPU; ``prefault`` touches every page
    now) or ``cuda`` (GPU; on ``device``, default the current one)."""
    if handle.kind == "shm":
        return ShmArena.attach(handle, prefault=prefault)
    if handle.kind == "cuda":
        return CudaArena.attach(handle, device=device, runtime=runtime)
    raise ArenaError(f"unknown arena kind {handle.kind!r} (expected 'shm' or 'cuda')")
