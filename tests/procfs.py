"""Reading /proc in tests: which processes hold or map a file, whether a process is gone."""

from __future__ import annotations

import os
import time
from pathlib import Path


def arena_file(pid: int) -> tuple[int, int]:
    """(st_dev, st_ino) of the unnamed /dev/shm file that process ``pid`` holds open."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/dev/shm/") and target.endswith(" (deleted)"):
            st = os.stat(fd)
            return st.st_dev, st.st_ino
    raise AssertionError(f"pid {pid} holds no unnamed /dev/shm file")


def holders(dev: int, ino: int) -> set[int]:
    """Pids of the processes (ours to read) that map the file or hold a descriptor of it."""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x} {ino} "
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(want in line for line in (proc / "maps").read_text().splitlines()):
                found.add(int(proc.name))
                continue
            for fd in (proc / "fd").iterdir():
                st = os.stat(fd)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    found.add(int(proc.name))
                    break
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def gone(pid: int) -> bool:
    """Exited (a zombie, which no init may have reaped yet, holds nothing any more: no mapping,
    no descriptor)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def wait_gone(pids: list[int], timeout_s: float = 30.0) -> list[int]:
    """The pids still alive after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if not gone(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive
