"""The arena channel's wire type: ``ArenaHandle``, how a child finds the shared arena.

On CPU hosts the daemon's descriptor of an unnamed /dev/shm file, which each child inherits
under the same number; on GPU hosts a hex-encoded CUDA IPC handle. The mapping code is
``harli.arena``.
"""

from __future__ import annotations

import msgspec


class ArenaHandle(msgspec.Struct, tag=True, kw_only=True, array_like=True, frozen=True):
    """Where the arena is and how it is cut into pages; the daemon hands it to each child as
    JSON on its command line."""

    kind: str  # "shm" (CPU) or "cuda"
    # shm: a path that opens the file while its creator lives, /proc/<creator pid>/fd/<fd>
    # (the file itself has no name); cuda: the IPC handle, hex
    name: str
    size_bytes: int
    page_bytes: int
    generation: int  # bumps when the daemon recreates the arena
    # shm: the creator's descriptor of the file; the daemon's children inherit it under this
    # number (Popen pass_fds) and map it. -1: none to inherit (cuda), open ``name`` instead.
    fd: int = -1

    @property
    def num_pages(self) -> int:
        return self.size_bytes // self.page_bytes
