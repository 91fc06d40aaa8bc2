"""``DatasetValidations``: the jobs whose files are being checked, each in a worker process of
its own (``python -m harli.daemon.validation_worker``), so that a file of any size costs the
daemon's loop and memory nothing: the loop only reads the workers' progress and outcomes
between its other work.

A worker starts in about a tenth of a second (it imports msgspec and the record reader; the
tokenizer's libraries only once the structure check has passed), so a bad line is reported
without waiting for them. It talks to the daemon over a socket pair in ``multiprocessing``'s
framing (``Connection.send_bytes``) with msgspec messages. At most ``max_workers`` run at once;
the rest wait their turn. A validation is cancelled by killing its worker, so a cancel or the
daemon's stop takes effect at once, however far a worker is into a file.

Checking a file is finetune-class work: its memory traffic slows decode as training does, if
less (measured: decode's TPOT p50 +5 % while a worker scans on the other core at full speed).
So it yields as the finetune does: while decode is serving and the scheduler gives the finetune
level 0, every worker is stopped (SIGSTOP), and continued (SIGCONT) once that has not been so
for ``RELEASE_S``. An idle decode never holds them, so a daemon whose policy keeps the
finetune at level 0 still checks the files of the jobs it queues.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec

from harli.daemon.supervisor import describe_returncode
from harli.ipc.validation import (
    ValidateJob,
    ValidationDone,
    ValidationFailed,
    ValidationProgress,
    WorkerToDaemon,
)

logger = logging.getLogger(__name__)

# Messages read from one worker per call of ``poll``: a fast worker never holds the loop.
_READ_BATCH = 64
# How long ``close`` waits for killed workers to be reaped.
_REAP_S = 2.0
# Workers held for decode continue only after this long without a reason to hold them: the
# scheduler's level may flip at every decode iteration.
RELEASE_S = 0.25
# A running worker (not held) that has sent nothing for this long is logged once with its
# kernel state: what it waits on is the one clue a stuck check leaves.
STALL_S = 30.0

Outcome = ValidationDone | ValidationFailed


@dataclass(frozen=True)
class StageEnded:
    """A stage of a file's check that has just ended: its last progress and how long it
    took."""

    progress: ValidationProgress
    seconds: float


@dataclass
class _Worker:
    request: ValidateJob
    proc: subprocess.Popen[bytes]
    conn: Connection
    progress: ValidationProgress | None = None
    stage_began_s: float = 0.0
    heard_s: float = 0.0  # when it last sent anything (or started)
    stall_logged: bool = False


# What ``poll`` reports of a job: a stage that began (its first progress) or the outcome, and
# the stage that ended with it, if any.
Report = tuple[int, ValidationProgress | Outcome, StageEnded | None]


class DatasetValidations:
    def __init__(self, max_workers: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_workers = max_workers
        self.clock = clock
        self._decoder = msgspec.msgpack.Decoder(WorkerToDaemon)
        self._running: dict[int, _Worker] = {}
        self._waiting: deque[ValidateJob] = deque()
        self.held = False  # decode needs the machine: every worker stopped
        self._hold_until = 0.0

    def __contains__(self, job_id: int) -> bool:
        return job_id in self._running or any(r.job_id == job_id for r in self._waiting)

    def __len__(self) -> int:
        return len(self._running) + len(self._waiting)

    def submit(self, request: ValidateJob) -> None:
        self._waiting.append(request)
        self._start_waiting()

    def hold(self, needed: bool, now: float) -> None:
        """Stop every worker while decode ``needed`` the machine (it serves and the finetune's
        level is 0); continue them once it has not for ``RELEASE_S``."""
        if needed:
            self._hold_until = now + RELEASE_S
        held = needed or now < self._hold_until
        if held == self.held:
            return
        self.held = held
        for worker in self._running.values():
            _signal(worker, signal.SIGSTOP if held else signal.SIGCONT)

    def progress(self, job_id: int) -> ValidationProgress | None:
        """The worker's last report of ``job_id`` (None: waiting for a worker, or none yet)."""
        worker = self._running.get(job_id)
        return worker.progress if worker is not None else None

    def cancel(self, job_id: int) -> None:
        """Stop checking ``job_id``'s files."""
        self._waiting = deque(r for r in self._waiting if r.job_id != job_id)
        worker = self._running.pop(job_id, None)
        if worker is not None:
            _kill(worker)
        self._start_waiting()

    def poll(self) -> list[Report]:
        """What the workers reported since the last call that the job's log keeps: each stage
        that began, and the outcome; progress within a stage is only kept (``progress``). A
        worker that ended without an outcome (killed, crashed) is reported as failed."""
        reports: list[Report] = []
        now = self.clock()
        for job_id, worker in list(self._running.items()):
            outcome = self._read(worker, reports)
            if outcome is None:
                self._check_stall(worker, now)
            if outcome is None and worker.proc.poll() is not None:
                outcome = self._read(worker, reports) or ValidationFailed(
                    error=f"the validation worker ended without a verdict "
                          f"({describe_returncode(worker.proc.returncode)}); attach the job "
                          f"again")
            if outcome is not None:
                del self._running[job_id]
                _kill(worker)
                reports.append((job_id, outcome, self._stage_ended(worker)))
        self._start_waiting()
        return reports

    def close(self) -> None:
        """Kill every worker (the daemon is stopping); their jobs stay ``validating_files``
        and are checked again when it starts."""
        self._waiting.clear()
        for worker in self._running.values():
            worker.proc.kill()
        deadline = time.monotonic() + _REAP_S
        for worker in self._running.values():
            try:
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("[validation] worker %d not reaped", worker.proc.pid)
            worker.conn.close()
        self._running.clear()

    def _check_stall(self, worker: _Worker, now: float) -> None:
        if self.held:
            worker.heard_s = now  # stopped on purpose: its silence is ours
            return
        if worker.stall_logged or now - worker.heard_s < STALL_S:
            return
        worker.stall_logged = True
        logger.warning("[validation] job %d: its worker (pid %d) has sent nothing for %.0f s "
                       "(last: %s); kernel state: %s", worker.request.job_id, worker.proc.pid,
                       now - worker.heard_s, worker.progress, process_state(worker.proc.pid))

    def _stage_ended(self, worker: _Worker) -> StageEnded | None:
        if worker.progress is None:
            return None
        return StageEnded(worker.progress, self.clock() - worker.stage_began_s)

    def _read(self, worker: _Worker, reports: list[Report]) -> Outcome | None:
        job_id = worker.request.job_id
        for _ in range(_READ_BATCH):
            try:
                if not worker.conn.poll():
                    return None
                msg = self._decoder.decode(worker.conn.recv_bytes())
            except (EOFError, OSError):
                return None  # the worker is gone; its exit says how
            except msgspec.DecodeError as e:  # our own worker: a bug to report
                logger.error("[validation] job %d: undecodable message from its worker: %s",
                             job_id, e)
                continue
            worker.heard_s = self.clock()
            worker.stall_logged = False
            if isinstance(msg, ValidationProgress):
                before = worker.progress
                if before is None or (before.key, before.stage) != (msg.key, msg.stage):
                    reports.append((job_id, msg, self._stage_ended(worker)))
                    worker.stage_began_s = self.clock()
                worker.progress = msg
            else:
                return msg
        return None

    def _start_waiting(self) -> None:
        while self._waiting and len(self._running) < self.max_workers:
            request = self._waiting.popleft()
            ours, theirs = socket.socketpair()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "harli.daemon.validation_worker",
                     str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL)
            finally:
                theirs.close()  # the worker's end: EOF here once it exits
            conn = Connection(ours.detach())
            conn.send_bytes(msgspec.msgpack.encode(request))
            worker = _Worker(request, proc, conn, heard_s=self.clock())
            if self.held:
                _signal(worker, signal.SIGSTOP)
            self._running[request.job_id] = worker


def process_state(pid: int) -> str:
    """A process's run state, CPU seconds, scheduling policy and wait channel, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip() or "-"
    except (OSError, IndexError):
        return "unreadable (the process is gone?)"
    # After the command's ")": state is field 3 of stat, utime 14, stime 15, policy 41.
    tick = os.sysconf("SC_CLK_TCK")
    cpu_s = (int(fields[11]) + int(fields[12])) / tick
    return f"state {fields[0]}, {cpu_s:.2f} s of CPU, policy {fields[38]}, waiting in {wchan}"


def _signal(worker: _Worker, sig: int) -> None:
    if worker.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # just ended: poll() says so next
            worker.proc.send_signal(sig)


def _kill(worker: _Worker) -> None:
    if worker.proc.poll() is None:
        worker.proc.kill()
    try:
        worker.proc.wait(_REAP_S)
    except subprocess.TimeoutExpired:
        logger.warning("[validation] worker %d not reaped", worker.proc.pid)
    worker.conn.close()
