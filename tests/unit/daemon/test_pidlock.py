"""The pid-file lock: one holder per dir, the second names the first, released on close."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harli.daemon.pidlock import PID_FILE, AlreadyRunning, PidLock


def test_second_lock_on_same_dir_names_the_holder(tmp_path: Path) -> None:
    run, state = tmp_path / "run", tmp_path / "state"
    run.mkdir()
    state.mkdir()
    first = PidLock([run, state])
    assert (run / PID_FILE).read_text().strip() == str(os.getpid())
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(AlreadyRunning, match=rf"already running \(pid {os.getpid()}\)"):
        PidLock([other, state])  # a different runtime dir, the same state dir
    # The failed attempt left the first holder's file intact.
    assert (state / PID_FILE).read_text().strip() == str(os.getpid())
    first.release()
    second = PidLock([run, state])  # free again once released
    second.release()


def test_same_dir_twice_is_locked_once(tmp_path: Path) -> None:
    lock = PidLock([tmp_path, tmp_path / "."])
    lock.release()
