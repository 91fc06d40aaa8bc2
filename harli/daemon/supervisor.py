"""Child supervision: a per-child state machine, the OS behind one ``ProcessOps`` object, and
the stop ladder (message -> SIGTERM -> SIGKILL), with an optional hook before the first signal
(MPS: ``terminate_client``, see ``daemon/mps.py``).

Modelled on supervisor's ``Subprocess.transition()``: the daemon calls ``transition(now)`` every
loop turn and gets back what happened; the clock and the OS are injectable so tests can run one
tick at a time against fakes.

Two ways a child ends early and comes back: a crash (it died, or never became ready), which
counts toward ``start_retries`` and so toward FATAL; and a restart the daemon forces on a
healthy child for a reason outside it (``Child.restart``: MPS restart-both, decode's shared
weights gone), which is counted apart and never makes a child FATAL. A child that exits with
``EXIT_CONFIG`` (its configuration is wrong) goes FATAL at once: no restart could succeed.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from harli.config import SupervisorConfig
from harli.runtime import EXIT_CONFIG

logger = logging.getLogger(__name__)


class ChildState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"  # spawned, READY not yet received
    RUNNING = "running"
    BACKOFF = "backoff"  # crashed, or restart() forced; waiting to be restarted
    STOPPING = "stopping"
    FATAL = "fatal"  # crashed too often; not restarted


class ProcHandle(Protocol):
    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class ProcessOps(Protocol):
    """Everything the supervisor asks of the OS."""

    def spawn(self, argv: Sequence[str], env: dict[str, str],
              pass_fds: Sequence[int] = ()) -> ProcHandle:
        """Start ``argv``; the descriptors in ``pass_fds`` stay open in it, same numbers."""
        ...

    def kill(self, proc: ProcHandle, sig: int) -> None: ...


class PopenOps:
    """The real OS: each child leads its own process group, so a signal reaches its tree."""

    def spawn(self, argv: Sequence[str], env: dict[str, str],
              pass_fds: Sequence[int] = ()) -> ProcHandle:
        return subprocess.Popen(list(argv), env=env, start_new_session=True,
                                pass_fds=tuple(pass_fds))

    def kill(self, proc: ProcHandle, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


@dataclass(frozen=True)
class ChildExited:
    """The child process ended on its own (not through ``stop``)."""

    name: str
    incarnation: int
    returncode: int
    was_running: bool


@dataclass(frozen=True)
class ChildFatal:
    name: str
    crashes: int


ChildEvent = ChildExited | ChildFatal


def describe_returncode(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _wait(proc: ProcHandle, timeout_s: float) -> int | None:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def stop_ladder(proc: ProcHandle, ops: ProcessOps, request_stop: Callable[[], object] | None,
                grace_s: float, term_timeout_s: float, name: str = "child",
                before_signal: Callable[[int], None] | None = None) -> int:
    """Stop ``proc``: ask by message, then SIGTERM, then SIGKILL; return its exit status.

    ``before_signal(pid)`` runs once, before the first signal (MPS: ``terminate_client``). It
    comes before SIGTERM, not only SIGKILL, because our children leave SIGTERM at its default
    action, which ends them as abruptly as SIGKILL, GPU work in flight or not.

    Module-level so finalizers and tests can call it without the owning object (vLLM's
    ``shutdown(procs)``).
    """
    if proc.poll() is not None:
        return proc.wait()
    if request_stop is not None:
        request_stop()
        rc = _wait(proc, grace_s)
        if rc is not None:
            logger.info("[shutdown] %s exited on request (%s)", name, describe_returncode(rc))
            return rc
        logger.warning("[shutdown] %s did not stop within %.1f s; sending SIGTERM", name, grace_s)
    run_before_signal(before_signal, proc, name)
    ops.kill(proc, signal.SIGTERM)
    rc = _wait(proc, term_timeout_s)
    if rc is not None:
        logger.info("[shutdown] %s exited on SIGTERM (%s)", name, describe_returncode(rc))
        return rc
    logger.warning("[shutdown] %s ignored SIGTERM for %.1f s; sending SIGKILL", name,
                   term_timeout_s)
    ops.kill(proc, signal.SIGKILL)
    return proc.wait()


def run_before_signal(hook: Callable[[int], None] | None, proc: ProcHandle, name: str) -> None:
    """Run a pre-signal hook on a live process; its failure never keeps the signal back."""
    if hook is None or proc.poll() is not None:
        return
    try:
        hook(proc.pid)
    except Exception:
        logger.exception("[supervisor] pre-signal hook for %s (pid %d) failed; signalling "
                         "anyway", name, proc.pid)


class Child:
    """One supervised child process and its lifecycle."""

    def __init__(self, name: str, argv: Callable[[int], Sequence[str]], env: dict[str, str],
                 cfg: SupervisorConfig, ops: ProcessOps, *,
                 may_start: Callable[[], bool] = lambda: True,
                 before_signal: Callable[[int], None] | None = None,
                 pass_fds: Sequence[int] = ()) -> None:
        self.name = name
        self._argv = argv
        self._env = env
        # Inherited by every incarnation (the CPU arena's descriptor).
        self._pass_fds = tuple(pass_fds)
        self.cfg = cfg
        self.ops = ops
        self.state = ChildState.STOPPED
        self.proc: ProcHandle | None = None
        self.incarnation = 0
        self.crashes = 0  # consecutive; reset once the child has been RUNNING stable_after_s
        self.restarts = 0  # total, for metrics
        self.forced_restarts = 0  # of those, the ones restart() forced (no crash counted)
        self._started_at = 0.0
        self._ready_at: float | None = None
        self._backoff_until = 0.0
        # Why restart() is ending the current incarnation (None: any end of it is a crash),
        # and whether the pending restart in BACKOFF is a forced one.
        self._forcing: str | None = None
        self._backoff_forced = False
        # A restart waits while this says no (decode: until no finetune lease lies in the KV
        # cache a new engine would zero).
        self.may_start = may_start
        # Called with the pid before any signal that ends the child (MPS: terminate_client,
        # so that no GPU work of it is in flight when the signal lands).
        self.before_signal = before_signal

    # -- commands ----------------------------------------------------------------------------

    def start(self, now: float) -> None:
        if self.state not in (ChildState.STOPPED, ChildState.BACKOFF):
            raise RuntimeError(f"cannot start {self.name} in state {self.state.value}")
        self.incarnation += 1
        self._forcing = None
        self.proc = self.ops.spawn(self._argv(self.incarnation), self._env, self._pass_fds)
        self._started_at = now
        self._ready_at = None
        self.state = ChildState.STARTING
        logger.info("[supervisor] %s[%d] spawned, pid %d", self.name, self.incarnation,
                    self.proc.pid)

    def on_ready(self, incarnation: int, now: float) -> bool:
        """READY from the child; ignored (False) if it comes from an older incarnation."""
        if incarnation != self.incarnation or self.state is not ChildState.STARTING:
            return False
        self.state = ChildState.RUNNING
        self._ready_at = now
        logger.info("[supervisor] %s[%d] ready after %.1f s", self.name, incarnation,
                    now - self._started_at)
        return True

    def stop(self, request_stop: Callable[[], object] | None) -> int | None:
        """Run the stop ladder (blocking); the child ends STOPPED."""
        rc = None
        if self.proc is not None and self.state in (ChildState.STARTING, ChildState.RUNNING):
            self.state = ChildState.STOPPING
            rc = stop_ladder(self.proc, self.ops, request_stop, self.cfg.stop_grace_s,
                             self.cfg.term_timeout_s, name=self.name,
                             before_signal=self.before_signal)
        self.proc = None
        self._forcing = None
        self.state = ChildState.STOPPED
        return rc

    def kill(self, reason: str) -> None:
        """SIGKILL now, without waiting: ``transition`` reaps it and reports ``ChildExited``
        (used when a child can no longer be trusted to stop on a message in time)."""
        if self.proc is not None and self.state in (ChildState.STARTING, ChildState.RUNNING):
            logger.error("[supervisor] killing %s[%d]: %s", self.name, self.incarnation, reason)
            run_before_signal(self.before_signal, self.proc, self.name)
            self.ops.kill(self.proc, signal.SIGKILL)

    def restart(self, reason: str) -> None:
        """``kill`` a child we must end for a reason outside it (MPS restart-both: a sibling's
        GPU fault; the finetune: decode's weights it trains on are gone). It comes back after
        ``backoff_initial_s`` and the end is *not* counted as a crash: a restart we forced says
        nothing about the child, so it must not bring the child closer to FATAL."""
        if self.proc is not None and self.state in (ChildState.STARTING, ChildState.RUNNING):
            self._forcing = reason
            self.kill(reason)

    # -- time --------------------------------------------------------------------------------

    def transition(self, now: float) -> list[ChildEvent]:
        """Advance the state machine; return what happened since the last call."""
        events: list[ChildEvent] = []
        if self.state in (ChildState.STARTING, ChildState.RUNNING):
            assert self.proc is not None
            rc = self.proc.poll()
            if rc is not None:
                was_running = self.state is ChildState.RUNNING
                logger.error("[supervisor] %s[%d] died (%s)", self.name, self.incarnation,
                             describe_returncode(rc))
                events.append(ChildExited(self.name, self.incarnation, rc, was_running))
                events.extend(self._ended(now, rc))
            elif self.state is ChildState.STARTING and \
                    now - self._started_at > self.cfg.start_timeout_s:
                logger.error("[supervisor] %s[%d] not ready after %.0f s; killing it", self.name,
                             self.incarnation, self.cfg.start_timeout_s)
                run_before_signal(self.before_signal, self.proc, self.name)
                self.ops.kill(self.proc, signal.SIGKILL)
                rc = self.proc.wait()
                events.append(ChildExited(self.name, self.incarnation, rc, False))
                events.extend(self._ended(now))
            elif (self.state is ChildState.RUNNING and self.crashes and self._ready_at is not None
                  and now - self._ready_at >= self.cfg.stable_after_s):
                self.crashes = 0
        elif self.state is ChildState.BACKOFF and now >= self._backoff_until and self.may_start():
            self.restarts += 1
            if self._backoff_forced:
                self.forced_restarts += 1
            self.start(now)
        return events

    def _ended(self, now: float, rc: int | None = None) -> list[ChildEvent]:
        # An incarnation restart() was ending is a forced restart even if it died of something
        # else just before the SIGKILL landed: the daemon had already given up on it.
        if self._forcing is not None:
            return self._forced(now, self._forcing)
        return self._crashed(now, rc)

    def _forced(self, now: float, reason: str) -> list[ChildEvent]:
        self.proc = None
        self._forcing = None
        self._backoff_forced = True
        self._backoff_until = now + self.cfg.backoff_initial_s
        self.state = ChildState.BACKOFF
        logger.info("[supervisor] restarting %s in %.1f s, forced (%s); not a crash, the count "
                    "stays at %d of %d allowed", self.name, self.cfg.backoff_initial_s, reason,
                    self.crashes, self.cfg.start_retries)
        return []

    def _crashed(self, now: float, rc: int | None = None) -> list[ChildEvent]:
        self.proc = None
        self.crashes += 1
        if rc == EXIT_CONFIG:
            # The child said its configuration is wrong: every restart would fail the same way.
            self.state = ChildState.FATAL
            logger.error("[supervisor] %s failed on its configuration (exit code %d); not "
                         "restarting it (FATAL)", self.name, rc)
            return [ChildFatal(self.name, self.crashes)]
        if self.crashes > self.cfg.start_retries:
            self.state = ChildState.FATAL
            logger.error("[supervisor] %s crashed %d times in a row; giving up (FATAL)",
                         self.name, self.crashes)
            return [ChildFatal(self.name, self.crashes)]
        delay = min(self.cfg.backoff_initial_s * 2 ** (self.crashes - 1), self.cfg.backoff_max_s)
        self._backoff_forced = False
        self._backoff_until = now + delay
        self.state = ChildState.BACKOFF
        logger.info("[supervisor] restarting %s in %.1f s (crash %d of %d allowed)", self.name,
                    delay, self.crashes, self.cfg.start_retries)
        return []
