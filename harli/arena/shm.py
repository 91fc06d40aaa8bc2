"""The CPU arena: one /dev/shm region created by the daemon and mapped by both children.

The region is a file in /dev/shm *without a name* (``O_TMPFILE``; where the filesystem lacks
it, a named file unlinked at once): it lives exactly as long as some process holds its file
descriptor or maps it, so a daemon killed with SIGKILL, once its children have died with it
(``PR_SET_PDEATHSIG``), leaves nothing behind. The daemon keeps the descriptor for its
lifetime and hands it to every child it (re)starts (``Popen(pass_fds=...)``, same number);
``harli.ipc.arena.ArenaHandle`` carries that number, and ``/proc/<daemon pid>/fd/<fd>`` as
the name any other process of the same user can open while the daemon lives
(``harli.arena.cuda`` is the GPU implementation of the same ``Arena`` interface). Being in
/dev/shm, it still counts against that filesystem's size, which ``create`` checks.

The region is cut into fixed-size pages, the unit of the daemon's ``PageLedger``. Tensors are
zero-copy views (``torch.frombuffer`` over the mapping).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
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
    """Unlink ``harli-<pid>-arena`` files whose daemon is gone: left by versions that kept the
    arena under that name (a SIGKILLed daemon left it), or, where /dev/shm lacks
    ``O_TMPFILE``, by a daemon killed between creating its arena and unlinking it."""
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


def _unnamed_file(shm_dir: Path, name: str) -> int:
    """A new, empty file in ``shm_dir`` that no path reaches: ``O_TMPFILE`` (tmpfs has it since
    Linux 3.11), else ``name`` created and unlinked at once."""
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            return os.open(shm_dir, tmpfile | os.O_RDWR, 0o600)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    path = shm_dir / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        path.unlink()
    except BaseException:
        os.close(fd)
        raise
    return fd


def _inherited_fd(handle: ArenaHandle) -> int | None:
    """A new descriptor of the arena if this process holds ``handle.fd`` (a child the daemon
    spawned, or the creator itself), else None. The descriptor must look like the arena (an
    unlinked regular file of its size), so that a handle read by a process that did not
    inherit it never maps some other file that happens to have that number."""
    if handle.fd < 0:
        return None
    try:
        st = os.fstat(handle.fd)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_nlink or st.st_size != handle.size_bytes:
        return None
    return os.dup(handle.fd)


class ShmArena:
    """CPU arena: an unnamed /dev/shm file, mmapped in every process that uses it."""

    def __init__(self, handle: ArenaHandle, fd: int, owner: bool) -> None:
        self.handle = handle
        self._owner = owner
        # The creator keeps its descriptor until close(): every child it starts inherits it.
        # An attached process needs only the mapping.
        self._fd = fd if owner else -1
        try:
            self._mm = mmap.mmap(fd, handle.size_bytes, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        if not owner:
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
        fd = _unnamed_file(shm_dir, name)
        try:
            os.ftruncate(fd, size_bytes)
        except BaseException:
            os.close(fd)
            raise
        handle = ArenaHandle(kind="shm", name=f"/proc/{os.getpid()}/fd/{fd}",
                             size_bytes=size_bytes, page_bytes=page_bytes,
                             generation=generation, fd=fd)
        return cls(handle, fd, owner=True)

    @classmethod
    def attach(cls, handle: ArenaHandle, prefault: bool = True) -> ShmArena:
        """Map the arena: through ``handle.fd`` where this process inherited it (the daemon's
        children), else by opening ``handle.name`` (any process of the creator's user, while
        the creator lives)."""
        if handle.kind != "shm":
            raise ArenaError(f"cannot attach a {handle.kind!r} arena on this host")
        fd = _inherited_fd(handle)
        if fd is None:
            try:
                fd = os.open(handle.name, os.O_RDWR)
            except FileNotFoundError:
                raise ArenaError(f"arena {handle.name} does not exist (its daemon exited or "
                                 f"restarted?)") from None
            size = os.fstat(fd).st_size
            if size != handle.size_bytes:
                os.close(fd)
                raise ArenaError(f"{handle.name} is not the arena: {size} bytes, expected "
                                 f"{handle.size_bytes}")
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
        # Tensors may still view the mapping; it then goes when they do. The memory itself
        # goes when no process maps the file or holds its descriptor any more.
        with contextlib.suppress(BufferError):
            self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
