"""One daemon per runtime and state dir: an ``flock``ed pid file in each.

Taken before the daemon touches anything else (sockets, arena, job store), so that a second
``harli daemon`` on the same dirs exits naming the first instead of rebinding, and later
unlinking, the first daemon's sockets. The kernel drops an ``flock`` when its holder dies,
so a daemon killed with SIGKILL leaves no stale lock behind (the file may stay, unlocked; the
next daemon takes it over). A clean ``release`` removes the file.

Removing a locked file races with a daemon that opened it just before: that one would then
lock a file no longer at the path while a third locks a new one. So only the holder ever
unlinks (before it unlocks), and a lock counts only once the file it locked is still the one
at the path (same device and inode); otherwise the taker opens the path again.
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
        self._held: list[tuple[Path, int]] = []  # (path, locked fd)
        try:
            for d in dict.fromkeys(Path(x).resolve() for x in dirs):  # once per distinct dir
                path = d / PID_FILE
                self._held.append((path, _lock(path)))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Remove each pid file that is still ours, then unlock it."""
        for path, fd in self._held:
            try:
                if _same_file(fd, path):
                    path.unlink()
            except OSError:
                pass  # a dir gone or read-only: the file stays, unlocked, which is harmless
            finally:
                os.close(fd)  # the lock goes with the fd
        self._held.clear()


def _lock(path: Path) -> int:
    while True:
        # O_CLOEXEC: the children must not inherit the lock (they could outlive the daemon
        # and keep a restarted one out).
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _same_file(fd, path):
                # Its holder removed it between our open and our lock (a clean exit): the
                # lock is on a file nobody else will look at. Take the path's file instead.
                os.close(fd)
                continue
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


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
