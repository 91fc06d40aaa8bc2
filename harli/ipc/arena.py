"""The arena channel's wire type: ``ArenaHandle``, how a child finds the shared arena.

A /dev/shm path on CPU hosts, a hex-encoded CUDA IPC handle on GPU hosts; the mapping code is
``harli.arena``.
"""

from __future__ import annotations

import msgspec


class ArenaHandle(msgspec.Struct, tag=True, kw_only=True, array_like=True, frozen=True):
    """Where the arena is and how it is cut into pages; the daemon hands it to each child as
    JSON on its command line."""

    kind: str  # "shm" (CPU) or "cuda"
    name: str  # shm: the file's path
    size_bytes: int
    page_bytes: int
    generation: int  # bumps when the daemon recreates the arena

    @property
    def num_pages(self) -> int:
        return self.size_bytes // self.page_bytes
