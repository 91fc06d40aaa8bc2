"""What a daemon killed with SIGKILL leaves behind. The arena: nothing, once its children have
died with it (it is an unnamed /dev/shm file, and the kernel frees it with its last holder).
The Unix sockets: their files, which the next daemon on the same dirs replaces when it binds
(under its pid lock)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.procfs import arena_file, holders, wait_gone

from .conftest import make_daemon

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

SOCKETS = {"inference.sock", "control.sock", "decode-in.sock", "decode-out.sock",
           "finetune-in.sock", "finetune-out.sock", "http-out.sock", "telemetry.sock"}


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
        # The socket files stay until the next start.
        stale = {p.name for p in run_dir.glob("*.sock")}
        assert stale == SOCKETS, stale
    restarted_at = time.time_ns()
    d2 = make_daemon(tmp_path, tiny_model)  # same runtime and state dirs
    with d2:
        with d2.client(timeout_s=120) as c:
            out = c.complete([1, 2, 3], max_tokens=4, ignore_eos=True)
        assert len(out.token_ids) == 4
        # Each socket file is the new daemon's (its bind replaced the stale one).
        fresh = {p.name: p.stat().st_ctime_ns for p in run_dir.glob("*.sock")}
        assert set(fresh) == SOCKETS, fresh
        assert all(t > restarted_at for t in fresh.values()), fresh
        assert d2.proc is not None
        arena_file(d2.proc.pid)  # a new arena, unnamed as well
    assert not list(run_dir.glob("*.sock"))
