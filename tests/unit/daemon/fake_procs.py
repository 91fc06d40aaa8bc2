"""Fakes of the supervisor's OS boundary (``ProcessOps``, ``ProcHandle``) shared by the unit
tests of the supervisor, the MPS restart rule and the daemon's handlers."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.pass_fds: tuple[int, ...] = ()  # what spawn was asked to let it inherit
        # What each signal does to it (None: it ignores that signal).
        self.on_signal: dict[int, int | None] = {signal.SIGTERM: -15, signal.SIGKILL: -9}

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired("fake", timeout or 0)
        return self.returncode


class FakeOps:
    """Spawns ``FakeProc``s (pids 100, 101, ...); records every signal, and in ``log`` (when
    given) as ``"signal SIGTERM 100"`` lines."""

    def __init__(self, log: list[str] | None = None) -> None:
        self.log = log
        self.procs: list[FakeProc] = []
        self.signals: list[tuple[int, int]] = []

    def spawn(self, argv: Sequence[str], env: dict[str, str],
              pass_fds: Sequence[int] = ()) -> FakeProc:
        p = FakeProc(100 + len(self.procs))
        p.pass_fds = tuple(pass_fds)
        self.procs.append(p)
        return p

    def kill(self, proc: FakeProc, sig: int) -> None:
        self.signals.append((proc.pid, sig))
        if self.log is not None:
            self.log.append(f"signal {signal.Signals(sig).name} {proc.pid}")
        if proc.on_signal.get(sig) is not None and proc.returncode is None:
            proc.returncode = proc.on_signal[sig]
