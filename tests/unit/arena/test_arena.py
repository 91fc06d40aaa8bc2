"""The CPU arena: created by one process, attached by another, zero-copy both ways."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import pytest
import torch

from harli.arena.shm import ArenaError, ShmArena, consecutive_runs, page_range
from harli.ipc.arena import ArenaHandle

PAGE = 64 << 10


@pytest.fixture
def arena() -> ShmArena:
    a = ShmArena.create(f"harli-test-{uuid.uuid4().hex[:8]}", 8 * PAGE, PAGE)
    yield a  # type: ignore[misc]
    a.close()


@pytest.mark.multiproc
def test_a_second_process_sees_writes_both_ways(arena: ShmArena) -> None:
    off, n = page_range(arena.handle, 3)
    arena.tensor(off, n, torch.float32).fill_(1.5)
    blob = msgspec.msgpack.encode(arena.handle)
    child = (
        "import sys, msgspec, torch\n"
        "from harli.ipc.arena import ArenaHandle\n"
        "from harli.arena.shm import ShmArena, page_range\n"
        "h = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=ArenaHandle)\n"
        "a = ShmArena.attach(h)\n"
        "off, n = page_range(h, 3)\n"
        "assert float(a.tensor(off, n, torch.float32).sum()) == 1.5 * n / 4\n"
        "off, n = page_range(h, 5)\n"
        "a.tensor(off, n, torch.int32).fill_(7)\n"
    )
    subprocess.run([sys.executable, "-c", child], input=blob, check=True, timeout=60)
    off, n = page_range(arena.handle, 5)
    assert bool((arena.tensor(off, n, torch.int32) == 7).all())
    assert int(arena.tensor(*page_range(arena.handle, 4)).sum()) == 0  # untouched page


def test_tensor_is_a_view_not_a_copy(arena: ShmArena) -> None:
    t = arena.tensor(0, PAGE)
    t[0] = 42
    assert int(arena.tensor(0, 16)[0]) == 42


def test_handle_round_trips_and_the_creators_close_ends_the_arena(tmp_path: Path) -> None:
    a = ShmArena.create(f"harli-test-{uuid.uuid4().hex[:8]}", 2 * PAGE, PAGE)
    h = msgspec.msgpack.decode(msgspec.msgpack.encode(a.handle), type=ArenaHandle)
    assert h == a.handle and h.num_pages == 2
    a.close()
    assert not Path(h.name).exists()
    with pytest.raises(ArenaError, match="does not exist"):
        ShmArena.attach(h)


def test_bad_sizes_are_clear_errors() -> None:
    with pytest.raises(ArenaError, match=r"memory\.arena_gib"):
        ShmArena.create("harli-test-huge", 1 << 50, PAGE)
    with pytest.raises(ArenaError, match="multiple of the page size"):
        ShmArena.create("harli-test-odd", PAGE + 1, PAGE)
    with pytest.raises(ArenaError, match="page_bytes"):
        ShmArena.create("harli-test-page", PAGE, 1000)


def test_out_of_range_views_and_pages_are_refused(arena: ShmArena) -> None:
    with pytest.raises(ArenaError, match="outside"):
        arena.tensor(7 * PAGE, 2 * PAGE)
    with pytest.raises(ArenaError, match="outside"):
        page_range(arena.handle, 8)
    with pytest.raises(ArenaError, match="aligned"):
        arena.tensor(2, 8, torch.float32)


def test_stale_arenas_of_dead_daemons_are_removed(tmp_path: Path) -> None:
    import os

    from harli.arena.shm import remove_stale_arenas

    dead = tmp_path / "harli-999999999-arena"
    alive = tmp_path / f"harli-{os.getpid()}-arena"
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    assert remove_stale_arenas(tmp_path) == [dead.name]
    assert alive.exists() and not dead.exists()


def test_consecutive_runs_cover_the_ids_once_in_order() -> None:
    assert consecutive_runs([7, 3, 4, 5, 9, 8]) == [(3, 6), (7, 10)]
    assert consecutive_runs([]) == [] and consecutive_runs({2}) == [(2, 3)]
