"""What the CPU arena leaves behind: nothing. It is an unnamed /dev/shm file, which the daemon's
children map through the descriptor they inherit, so its memory goes with the last process
that holds or maps it, a SIGKILLed creator included."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest
import torch

from harli.arena.shm import SHM_DIR, ArenaError, ShmArena, page_range
from harli.config import load
from harli.daemon.children import DAEMON_PID_ENV, ChildSpecs, CorePlan
from harli.ipc.arena import ArenaHandle
from tests.procfs import holders, wait_gone

PAGE = 64 << 10


@pytest.fixture
def arena() -> ShmArena:
    a = ShmArena.create(f"harli-test-{uuid.uuid4().hex[:8]}", 8 * PAGE, PAGE)
    yield a  # type: ignore[misc]
    a.close()


def test_a_mapped_arena_has_no_name_in_dev_shm(arena: ShmArena) -> None:
    st = os.fstat(arena.handle.fd)
    assert st.st_nlink == 0 and st.st_size == 8 * PAGE
    assert not any(f.name.endswith("-arena") and f.name.startswith("harli-test-")
                   for f in SHM_DIR.iterdir())
    named = set()
    for f in SHM_DIR.iterdir():
        with contextlib.suppress(FileNotFoundError):  # another process's, gone meanwhile
            named.add((os.stat(f).st_dev, os.stat(f).st_ino))
    assert (st.st_dev, st.st_ino) not in named
    assert os.getpid() in holders(st.st_dev, st.st_ino)
    # The handle names the creator's descriptor, and the /proc path that reopens it.
    assert arena.handle.name == f"/proc/{os.getpid()}/fd/{arena.handle.fd}"


CHILD = (
    "import sys, msgspec, torch\n"
    "from harli.ipc.arena import ArenaHandle\n"
    "from harli.arena.shm import ShmArena, page_range\n"
    "h = msgspec.json.decode(sys.argv[1], type=ArenaHandle)\n"
    "a = ShmArena.attach(h)\n"
    "off, n = page_range(h, 3)\n"
    "assert float(a.tensor(off, n, torch.float32).sum()) == 1.5 * n / 4\n"
    "off, n = page_range(h, 5)\n"
    "a.tensor(off, n, torch.int32).fill_(7)\n"
)


@pytest.mark.multiproc
def test_a_child_given_the_descriptor_sees_the_same_bytes(arena: ShmArena) -> None:
    off, n = page_range(arena.handle, 3)
    arena.tensor(off, n, torch.float32).fill_(1.5)
    # No path to fall back on: the child can reach the arena only through the descriptor.
    handle = msgspec.structs.replace(arena.handle, name="/nonexistent/arena")
    subprocess.run([sys.executable, "-c", CHILD, msgspec.json.encode(handle).decode()],
                   pass_fds=(arena.handle.fd,), check=True, timeout=60)
    off, n = page_range(arena.handle, 5)
    assert bool((arena.tensor(off, n, torch.int32) == 7).all())
    # Without the descriptor the same handle cannot be attached.
    res = subprocess.run([sys.executable, "-c", CHILD, msgspec.json.encode(handle).decode()],
                         capture_output=True, timeout=60)
    assert res.returncode != 0 and b"does not exist" in res.stderr


def test_a_descriptor_that_is_not_the_arena_is_never_mapped(
        arena: ShmArena, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"x" * PAGE)
    fd = os.open(other, os.O_RDWR)
    try:
        # Same number, other file (a process that did not inherit the arena's descriptor):
        # attach falls back on the name, which here leads nowhere.
        handle = msgspec.structs.replace(arena.handle, fd=fd, name="/nonexistent/arena")
        with pytest.raises(ArenaError, match="does not exist"):
            ShmArena.attach(handle)
        # A name that opens a file of another size is refused too.
        handle = msgspec.structs.replace(arena.handle, fd=-1, name=str(other))
        with pytest.raises(ArenaError, match="not the arena"):
            ShmArena.attach(handle)
    finally:
        os.close(fd)


def test_without_o_tmpfile_the_named_file_is_unlinked_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    a = ShmArena.create("harli-test-fallback-arena", 2 * PAGE, PAGE, shm_dir=tmp_path)
    try:
        assert list(tmp_path.iterdir()) == []
        assert os.fstat(a.handle.fd).st_nlink == 0
        a.tensor(0, 4)[:] = 3
        b = ShmArena.attach(a.handle, prefault=False)
        assert int(b.tensor(0, 4).sum()) == 12
        b.close()
    finally:
        a.close()


def test_close_releases_the_creators_descriptor() -> None:
    a = ShmArena.create(f"harli-test-{uuid.uuid4().hex[:8]}", 2 * PAGE, PAGE)
    st = os.fstat(a.handle.fd)
    a.close()
    a.close()  # at most once
    assert os.getpid() not in holders(st.st_dev, st.st_ino)


CREATOR = r"""
import subprocess, sys, time, msgspec
from harli.arena.shm import ShmArena
a = ShmArena.create(sys.argv[1], 4 << 16, 1 << 16)
a.tensor(0, 8).fill_(7)
child = subprocess.Popen([sys.executable, "-c", sys.argv[2], msgspec.json.encode(a.handle)],
                         pass_fds=(a.handle.fd,))
print(child.pid, flush=True)
time.sleep(600)
"""

MAPPER = r"""
import sys, time, msgspec
from harli.runtime import die_with_parent
die_with_parent()
from harli.ipc.arena import ArenaHandle
from tests.procfs import holders, wait_gone
from harli.arena.shm import ShmArena
a = ShmArena.attach(msgspec.json.decode(sys.argv[1], type=ArenaHandle), prefault=False)
assert int(a.tensor(0, 8).sum()) == 56
print("mapped", flush=True)
time.sleep(600)
"""


@pytest.mark.multiproc
def test_sigkill_of_the_creator_frees_the_arena_once_its_child_is_gone() -> None:
    creator = subprocess.Popen(
        [sys.executable, "-c", CREATOR, f"harli-test-{uuid.uuid4().hex[:8]}", MAPPER],
        stdout=subprocess.PIPE, text=True)
    try:
        assert creator.stdout is not None
        child = int(creator.stdout.readline())
        assert creator.stdout.readline().strip() == "mapped"
        fd = next(f for f in Path(f"/proc/{creator.pid}/fd").iterdir()
                  if os.readlink(f).startswith(str(SHM_DIR)))
        st = os.stat(fd)
        assert {creator.pid, child} <= holders(st.st_dev, st.st_ino)
        creator.send_signal(signal.SIGKILL)
        creator.wait(timeout=30)
        assert wait_gone([child]) == [], "the child outlived its SIGKILLed parent"
        assert holders(st.st_dev, st.st_ino) == set()
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.wait()


class _RecordingOps:
    def __init__(self) -> None:
        self.spawned: list[tuple[Sequence[str], dict[str, str], tuple[int, ...]]] = []

    def spawn(self, argv: Sequence[str], env: dict[str, str],
              pass_fds: Sequence[int] = ()) -> _RecordingOps:
        self.spawned.append((argv, env, tuple(pass_fds)))
        self.pid = 100 + len(self.spawned)
        return self

    def poll(self) -> int | None:
        return -9  # dies at once: every transition restarts it

    def wait(self, timeout: float | None = None) -> int:
        return -9

    def kill(self, proc: object, sig: int) -> None:
        pass


def test_every_incarnation_of_both_children_inherits_the_descriptor(arena: ShmArena) -> None:
    cfg = load(None, ["finetune.enabled=true", "supervisor.backoff_initial_s=0.1",
                      "supervisor.start_retries=5"])
    ops = _RecordingOps()
    specs = ChildSpecs(cfg, CorePlan(frozenset({0}), frozenset(), None), arena.handle, None,
                       ops)
    for child in (specs.decode(lambda: True), specs.finetune()):
        child.start(0.0)
        for t in range(1, 4):
            child.transition(100.0 * t)  # reaps the crash
            child.transition(100.0 * t + 50)  # restarts it, after the back-off
    assert len(ops.spawned) >= 6
    for argv, env, fds in ops.spawned:
        assert fds == (arena.handle.fd,)
        assert msgspec.json.decode(argv[argv.index("--arena") + 1], type=ArenaHandle) == \
            arena.handle
        assert env[DAEMON_PID_ENV] == str(os.getpid())


def test_no_descriptor_to_pass_without_a_cpu_arena() -> None:
    cfg = load(None, [])
    ops = _RecordingOps()
    cuda = ArenaHandle(kind="cuda", name="00" * 64, size_bytes=PAGE, page_bytes=PAGE,
                       generation=1)
    for handle in (None, cuda):
        ChildSpecs(cfg, CorePlan(frozenset({0}), frozenset(), None), handle, None,
                   ops).decode(lambda: True).start(0.0)
    assert [fds for _, _, fds in ops.spawned] == [(), ()]


@pytest.mark.multiproc
@pytest.mark.parametrize("module", ["harli.decode_proc", "harli.finetune_proc"])
def test_a_child_whose_daemon_is_already_gone_exits(module: str) -> None:
    """The window before PR_SET_PDEATHSIG is armed: the child sees that its parent is not the
    daemon that started it and leaves, instead of holding the arena with nobody to end it."""
    cfg = load(None, [])
    env = {**os.environ, DAEMON_PID_ENV: "1"}  # not our pid: "the daemon is gone"
    res = subprocess.run([sys.executable, "-m", module, "--incarnation", "1", "--config-json",
                          cfg.to_json().decode()], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1, res.stderr
    assert "the daemon that started it is gone" in res.stderr
