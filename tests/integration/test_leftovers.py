"""What a daemon killed with SIGKILL leaves behind. The arena: nothing, once its children have
died with it (it is an unnamed /dev/shm file, and the kernel frees it with its last holder).
The Unix sockets and the runtime dir's pid file: their files, which the next daemon on the same
dirs replaces when it binds (under its pid lock, which it takes over). And what a running daemon
has in its runtime dir (its sockets, each with its mode) and leaves after a clean stop: none of
them, nor its pid files."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from tests.procfs import arena_file, holders, wait_gone

from .conftest import make_daemon

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

SOCKETS = {"inference.sock", "control.sock", "decode-in.sock", "decode-out.sock",
           "finetune-in.sock", "finetune-out.sock", "http-out.sock", "telemetry.sock"}
# The public sockets let the service's group connect; the daemon <-> child ones are the owner's.
PUBLIC = {"inference.sock", "control.sock"}
PID_FILE = "harli.pid"


def _socket_modes(run_dir: Path) -> dict[str, int]:
    """Permission bits of every Unix socket in ``run_dir``, by name."""
    out = {}
    for p in run_dir.iterdir():
        st = p.lstat()
        if stat.S_ISSOCK(st.st_mode):
            out[p.name] = stat.S_IMODE(st.st_mode)
    return out


def test_sigkill_leaves_no_arena_and_the_next_daemon_replaces_the_sockets(
        tmp_path: Path, tiny_model: Path) -> None:
    d = make_daemon(tmp_path, tiny_model)
    run_dir = d.cfg.runtime_dir
    with d:
        assert d.proc is not None
        pid = d.proc.pid
        kids = d.children()
        assert len(kids) >= 2, kids  # decode and the finetune
        dev, ino = arena_file(pid)
        # The daemon and both children hold it (decode's KV cache lives there).
        held_by = holders(dev, ino)
        assert pid in held_by and len(held_by & set(kids)) >= 2, (held_by, kids)
        assert not Path(f"/dev/shm/harli-{pid}-arena").exists()
        d.proc.kill()
        d.proc.wait(timeout=30)
        # The children die with the daemon (PR_SET_PDEATHSIG), and the memory with them.
        assert wait_gone(kids) == [], "children outlived the SIGKILLed daemon"
        assert holders(dev, ino) == set()
        assert not Path(f"/dev/shm/harli-{pid}-arena").exists()
        # The socket files and the pid file stay until the next start.
        stale = {p.name for p in run_dir.glob("*.sock")}
        assert stale == SOCKETS, stale
        assert (run_dir / PID_FILE).read_text().strip() == str(pid)
    restarted_at = time.time_ns()
    d2 = make_daemon(tmp_path, tiny_model)  # same runtime and state dirs
    # Umask 0 in the daemon: without its chmods, every socket would be 0777.
    old_umask = os.umask(0)
    try:
        d2.start()
    finally:
        os.umask(old_umask)
    try:
        d2.wait_ready()
        assert d2.proc is not None
        # It took the dead daemon's lock over.
        assert (run_dir / PID_FILE).read_text().strip() == str(d2.proc.pid)
        with d2.client(timeout_s=120) as c:
            out = c.complete([1, 2, 3], max_tokens=4, ignore_eos=True)
        assert len(out.token_ids) == 4
        # Each socket file is the new daemon's (its bind replaced the stale one).
        fresh = {p.name: p.stat().st_ctime_ns for p in run_dir.glob("*.sock")}
        assert set(fresh) == SOCKETS, fresh
        assert all(t > restarted_at for t in fresh.values()), fresh
        # Every socket in the runtime dir, the telemetry one decode binds included, with its
        # mode whatever the umask; the dir itself is the owner's.
        modes = _socket_modes(run_dir)
        assert modes == {n: 0o660 if n in PUBLIC else 0o600 for n in SOCKETS}, \
            {n: oct(m) for n, m in modes.items()}
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        arena_file(d2.proc.pid)  # a new arena, unnamed as well
    finally:
        rc = d2.stop()
    assert rc == 0, d2.log_tail()
    # A clean stop leaves no socket and no pid file behind.
    assert not list(run_dir.glob("*.sock"))
    assert not (run_dir / PID_FILE).exists()
    assert not (d2.cfg.state_dir / PID_FILE).exists()
