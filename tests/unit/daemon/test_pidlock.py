"""The pid-file lock: one holder per dir, the second names the first; released (and its file
removed, if still ours) on close; a SIGKILLed holder's file is taken over."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
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


def test_release_removes_the_pid_files(tmp_path: Path) -> None:
    run, state = tmp_path / "run", tmp_path / "state"
    run.mkdir()
    state.mkdir()
    PidLock([run, state]).release()
    assert not (run / PID_FILE).exists() and not (state / PID_FILE).exists()


def test_release_leaves_a_pid_file_that_is_no_longer_ours(tmp_path: Path) -> None:
    lock = PidLock([tmp_path])
    path = tmp_path / PID_FILE
    path.unlink()
    path.write_text("4242\n")  # another daemon's, made after ours went (a new inode)
    lock.release()
    assert path.read_text() == "4242\n"


def test_a_stale_pid_file_of_a_killed_daemon_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / PID_FILE
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from harli.daemon.pidlock import PidLock; PidLock([Path(sys.argv[1])]); "
         "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[3])
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(AlreadyRunning, match=rf"pid {holder.pid}\)"):
            PidLock([tmp_path])
    finally:
        holder.kill()  # SIGKILL: no release, the file stays
        holder.wait()
    assert path.read_text().strip() == str(holder.pid)
    lock = PidLock([tmp_path])  # the kernel dropped the dead holder's lock
    assert path.read_text().strip() == str(os.getpid())
    lock.release()
    assert not path.exists()


def test_a_lock_on_a_file_its_holder_removed_meanwhile_is_taken_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / PID_FILE
    real_flock = fcntl.flock
    calls = []

    def flock_after_the_holder_released(fd: int, op: int) -> None:
        if not calls:  # between our open and our flock, the holder exits cleanly
            path.unlink()
        calls.append(fd)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_holder_released)
    lock = PidLock([tmp_path])
    assert len(calls) == 2  # the first lock was on the removed file, so it opened the path again
    assert path.read_text().strip() == str(os.getpid())
    monkeypatch.undo()
    with pytest.raises(AlreadyRunning):  # and the file at the path is the one locked
        PidLock([tmp_path])
    lock.release()
    assert not path.exists()
