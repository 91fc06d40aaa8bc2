"""The CPU arena: one /dev/shm region created by the daemon and mapped by both children.

``harli.ipc.arena.ArenaHandle`` is the message that carries it to a child (a /dev/shm path
here; ``harli.arena.cuda`` is the GPU implementation of the same ``Arena`` interface). The
region is cut into fixed-size pages, the unit of the daemon's ``PageLedger``. Tensors are
zero-copy views (``torch.frombuffer`` over the mapping).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from harli.ipc.arena import ArenaHandle

if TYPE_CHECKING:
    import torch

DEFAULT_PAGE_BYTES = 2 << 20
SHM_DIR = Path("/dev/shm")


class ArenaError(Exception):
    """The arena cannot be created or attached; the message says what to change."""


class Arena(Protocol):
    """What the daemon and the children need of an arena: ``ShmArena`` here on CPU hosts,
    ``harli.arena.cuda.CudaArena`` (device memory, its CUDA IPC handle in the handle) on GPU
    hosts."""

    handle: ArenaHandle

    @property
    def base_address(self) -> int: ...

    def tensor(self, offset: int, nbytes: int, dtype: Any = None) -> torch.Tensor: ...

    def close(self) -> None: ...


def consecutive_runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of consecutive ids (pages, KV blocks), in order: adjacent
    ids are adjacent bytes, so each run is one extent or one memset."""
    runs: list[tuple[int, int]] = []
    for i in sorted(ids):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def page_range(handle: ArenaHandle, page: int) -> tuple[int, int]:
    """Byte offset and length of ``page``."""
    if not 0 <= page < handle.num_pages:
        raise ArenaError(f"page {page} outside 0..{handle.num_pages - 1}")
    return page * handle.page_bytes, handle.page_bytes


def remove_stale_arenas(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink ``harli-<pid>-arena`` files whose daemon is gone (it was SIGKILLed)."""
    removed = []
    for f in shm_dir.glob("harli-*-arena"):
        try:
            pid = int(f.name.split("-")[1])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
            removed.append(f.name)
        except PermissionError:  # alive, someone else's
            pass
    return removed


class ShmArena:
    """CPU arena: a /dev/shm file, mmapped in every process that uses it."""

    def __init__(self, handle: ArenaHandle, fd: int, owner: bool) -> None:
        self.handle = handle
        self._owner = owner
        try:
            self._mm = mmap.mmap(fd, handle.size_bytes, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, name: str, size_bytes: int, page_bytes: int = DEFAULT_PAGE_BYTES,
               generation: int = 1, shm_dir: Path = SHM_DIR) -> ShmArena:
        if page_bytes <= 0 or page_bytes % mmap.PAGESIZE:
            raise ArenaError(f"memory.page_bytes must be a positive multiple of "
                             f"{mmap.PAGESIZE}, got {page_bytes}")
        if size_bytes < page_bytes or size_bytes % page_bytes:
            raise ArenaError(f"arena size {size_bytes} must be a positive multiple of the page "
                             f"size {page_bytes}")
        st = os.statvfs(shm_dir)
        free = st.f_bavail * st.f_frsize
        if size_bytes > free:
            raise ArenaError(f"arena of {size_bytes / 2**30:.2f} GiB does not fit in {shm_dir} "
                             f"({free / 2**30:.2f} GiB free); lower memory.arena_gib")
        path = shm_dir / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size_bytes)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        handle = ArenaHandle(kind="shm", name=str(path), size_bytes=size_bytes,
                             page_bytes=page_bytes, generation=generation)
        return cls(handle, fd, owner=True)

    @classmethod
    def attach(cls, handle: ArenaHandle, prefault: bool = True) -> ShmArena:
        if handle.kind != "shm":
            raise ArenaError(f"cannot attach a {handle.kind!r} arena on this host")
        try:
            fd = os.open(handle.name, os.O_RDWR)
        except FileNotFoundError:
            raise ArenaError(f"arena {handle.name} does not exist (daemon restarted?)") from None
        arena = cls(handle, fd, owner=False)
        if prefault:
            arena.prefault()
        return arena

    def prefault(self) -> None:
        """Touch every OS page once, so first-touch faults never land in a decode step
        (measured here: up to 0.9 s for 256 MiB on first touch)."""
        view = memoryview(self._mm)
        for off in range(0, len(view), mmap.PAGESIZE):
            view[off] = view[off]
        view.release()

    @property
    def base_address(self) -> int:
        """Virtual address of byte 0 in this process (to find where a tensor lies in it)."""
        import torch

        return int(torch.frombuffer(self._mm, dtype=torch.uint8, count=1).data_ptr())

    def tensor(self, offset: int, nbytes: int, dtype: Any = None) -> torch.Tensor:
        import torch

        dtype = dtype or torch.uint8
        if offset < 0 or nbytes < 0 or offset + nbytes > self.handle.size_bytes:
            raise ArenaError(f"range [{offset}, {offset + nbytes}) outside the arena of "
                             f"{self.handle.size_bytes} bytes")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if nbytes % itemsize or offset % itemsize:
            raise ArenaError(f"range [{offset}, {offset + nbytes}) is not aligned to {dtype}")
        return torch.frombuffer(self._mm, dtype=dtype, count=nbytes // itemsize, offset=offset)

    def close(self) -> None:
        # Tensors may still view the mapping; it then goes when they do.
        with contextlib.suppress(BufferError):
            self._mm.close()
        if self._owner:
            Path(self.handle.name).unlink(missing_ok=True)
