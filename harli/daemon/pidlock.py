"""One daemon per runtime and state dir: an ``flock``ed pid file in each.

Taken before the daemon touches anything else (sockets, arena, job store), so that a second
``harli daemon`` on the same dirs exits naming the first instead of rebinding, and later
unlinking, the first daemon's sockets. The kernel drops an ``flock`` when its holder dies,
so a daemon killed with SIGKILL leaves no stale lock behind (the file may stay; it is only
read for the message).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

PID_FILE = "harli.pid"


class AlreadyRunning(Exception):
    """Another daemon holds the lock on one of the dirs."""


class PidLock:
    """Holds ``<dir>/harli.pid`` locked in each dir until ``release`` (or process exit)."""

    def __init__(self, dirs: list[Path]) -> None:
        self._fds: list[int] = []
        try:
            for d in dict.fromkeys(Path(x).resolve() for x in dirs):  # once per distinct dir
                self._fds.append(_lock(d / PID_FILE))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # the lock goes with the fd; the file stays, unlocked
        self._fds.clear()


def _lock(path: Path) -> int:
    # O_CLOEXEC: the children must not inherit the lock (they could outlive the daemon
    # and keep a restarted one out).
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f"pid {holder}" if holder else "pid unknown"
        raise AlreadyRunning(f"a harli daemon is already running ({who}) on {path.parent} "
                             f"(lock {path})") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
