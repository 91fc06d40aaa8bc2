"""The job store: finetune jobs, their progress, an event log and metric events, in SQLite
(WAL mode) in the state dir, so that jobs survive daemon restarts.

Progress is stored as absolute values reported by the trainer (step, micro-steps, tokens), never
as increments: a report replayed after a restart cannot count a step twice, and a resume sets
the step back to the checkpoint's, never further.

Metric events (a logged step's loss, tokens/s and level; a checkpoint's validation score) have
their own table, one typed column per number, rather than text in the event log: a loss curve is
a query, not a parse. A job resumed from checkpoint N drops its metric events past step N,
since the steps after it are trained (and logged) again: the curve is the one of the training
its adapter holds. One row per logged step is stored (``JobSpec.log_every`` thins them); reads
are paged by id.

Each checkpoint written is a row too (its step and directory), listed while the directory is
there. A job's ``owner`` is whoever attached it: the HTTP API's digest of an API key, "" for
the CLI.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from harli.ipc.control import (
    CheckpointInfo,
    JobEvent,
    JobInfo,
    JobMetric,
    TrainMetric,
    ValidMetric,
)
from harli.ipc.finetune import CheckpointSaved, MicroStepReport, StepLogged
from harli.ipc.jobs import JobSpec

QUEUED, RUNNING, PAUSED = "queued", "running", "paused"
# Stored at once, its files checked in the background (OpenAI's name for it); queued or failed
# once they have been.
VALIDATING = "validating_files"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
# Paused by a user (``harli job pause``, the HTTP API's pause) until resumed: not scheduled.
# Not ``paused``, which is a running job that the quota gives no compute now.
HELD = "held"
ACTIVE = (RUNNING, PAUSED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_s REAL NOT NULL,
    started_s REAL,
    finished_s REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    epoch INTEGER NOT NULL DEFAULT 0,
    micro_steps INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    first_loss REAL,
    level INTEGER,
    paused_s REAL NOT NULL DEFAULT 0,
    tokens_per_s REAL,
    checkpoint_step INTEGER,
    restarts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    adapter_path TEXT,
    dataset_report TEXT,
    fine_tuned_model TEXT,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(job_id),
    time_s REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, event_id);
CREATE TABLE IF NOT EXISTS metrics (
    metric_id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(job_id),
    time_s REAL NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    epoch REAL NOT NULL,
    tokens INTEGER NOT NULL,
    train_loss REAL,
    learning_rate REAL,
    grad_norm REAL,
    tokens_per_s REAL,
    level INTEGER,
    valid_loss REAL,
    valid_accuracy REAL,
    examples INTEGER
);
CREATE INDEX IF NOT EXISTS metrics_by_job ON metrics(job_id, metric_id);
CREATE INDEX IF NOT EXISTS metrics_by_kind ON metrics(job_id, kind, metric_id);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id INTEGER NOT NULL REFERENCES jobs(job_id),
    step INTEGER NOT NULL,
    path TEXT NOT NULL,
    time_s REAL NOT NULL,
    PRIMARY KEY (job_id, step)
);
"""
TRAIN, VALID = "train", "valid"  # metrics.kind

_COLUMNS = ("job_id", "name", "status", "priority", "created_s", "started_s", "finished_s",
            "step", "total_steps", "epoch", "micro_steps", "tokens", "loss", "first_loss",
            "level", "paused_s", "tokens_per_s", "checkpoint_step", "restarts", "error",
            "adapter_path", "dataset_report", "spec", "fine_tuned_model", "owner")
# Columns added since the first schema, with their types: added to an older database at open.
_ADDED_COLUMNS = {"fine_tuned_model": "TEXT", "owner": "TEXT NOT NULL DEFAULT ''"}
# JobInfo's latest validation score, read from the metric events (so a resume that drops some
# never leaves a stale copy behind).
_LATEST_VALID = {
    name: f"(SELECT m.{name} FROM metrics m WHERE m.job_id = jobs.job_id AND m.kind = "
          f"'{VALID}' ORDER BY m.metric_id DESC LIMIT 1)"
    for name in ("valid_loss", "valid_accuracy")}
_METRIC_COLUMNS = ("metric_id", "job_id", "time_s", "kind", "step", "epoch", "tokens",
                   "train_loss", "learning_rate", "grad_norm", "tokens_per_s", "level",
                   "valid_loss", "valid_accuracy", "examples")


def _metric(row: tuple[Any, ...]) -> JobMetric:
    d = dict(zip(_METRIC_COLUMNS, row, strict=True))
    common = {k: d[k] for k in ("metric_id", "job_id", "time_s", "step", "epoch", "tokens")}
    if d["kind"] == VALID:
        return ValidMetric(**common, valid_loss=d["valid_loss"],
                           valid_accuracy=d["valid_accuracy"], examples=d["examples"])
    return TrainMetric(**common, train_loss=d["train_loss"], learning_rate=d["learning_rate"],
                       grad_norm=d["grad_norm"], tokens_per_s=d["tokens_per_s"],
                       level=d["level"])


class DuplicateJobName(Exception):
    pass


class JobStore:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we open transactions explicitly, so a multi-row change is
        # all-or-nothing.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self.db.close()

    # -- reads -------------------------------------------------------------------------------

    def _row(self, row: tuple[Any, ...]) -> JobInfo:
        d = dict(zip((*_COLUMNS, *_LATEST_VALID), row, strict=True))
        d["spec"] = msgspec.json.decode(d["spec"], type=JobSpec)
        d["dataset_report"] = json.loads(d["dataset_report"]) if d["dataset_report"] else None
        return JobInfo(**d)

    def _select(self, where: str = "", args: tuple[Any, ...] = ()) -> list[JobInfo]:
        columns = ", ".join((*_COLUMNS, *_LATEST_VALID.values()))
        rows = self.db.execute(f"SELECT {columns} FROM jobs {where}", args)
        return [self._row(r) for r in rows]

    def get(self, job_id: int) -> JobInfo | None:
        jobs = self._select("WHERE job_id = ?", (job_id,))
        return jobs[0] if jobs else None

    def all_jobs(self, owner: str | None = None) -> list[JobInfo]:
        """Every job, oldest first; ``owner``: only the jobs it made."""
        if owner is None:
            return self._select("ORDER BY job_id")
        return self._select("WHERE owner = ? ORDER BY job_id", (owner,))

    def next_queued(self) -> JobInfo | None:
        jobs = self._select("WHERE status = ? ORDER BY priority DESC, job_id ASC LIMIT 1",
                            (QUEUED,))
        return jobs[0] if jobs else None

    def active(self) -> list[JobInfo]:
        return self._select("WHERE status IN (?, ?) ORDER BY job_id", ACTIVE)

    def events(self, job_id: int, after: int = 0, limit: int = -1) -> list[JobEvent]:
        """The job's events with an id above ``after``, oldest first, at most ``limit``
        (-1: all)."""
        rows = self.db.execute(
            "SELECT event_id, job_id, time_s, kind, message FROM events "
            "WHERE job_id = ? AND event_id > ? ORDER BY event_id LIMIT ?", (job_id, after, limit))
        return [JobEvent(event_id=r[0], job_id=r[1], time_s=r[2], kind=r[3], message=r[4])
                for r in rows]

    def metrics(self, job_id: int, after: int = 0, limit: int = -1) -> list[JobMetric]:
        """The job's metric events with an id above ``after``, oldest first, at most
        ``limit`` (-1: all)."""
        rows = self.db.execute(
            f"SELECT {', '.join(_METRIC_COLUMNS)} FROM metrics "
            "WHERE job_id = ? AND metric_id > ? ORDER BY metric_id LIMIT ?",
            (job_id, after, limit))
        return [_metric(r) for r in rows]

    def checkpoints(self, job_id: int) -> list[CheckpointInfo]:
        """The job's checkpoints whose directory is still there (a job keeps its newest
        ``keep_checkpoints``), oldest first, with the metric events of their steps."""
        rows = self.db.execute(
            "SELECT c.step, c.path, c.time_s, "
            "(SELECT m.train_loss FROM metrics m WHERE m.job_id = c.job_id AND m.kind = ? "
            " AND m.step = c.step ORDER BY m.metric_id DESC LIMIT 1), "
            "(SELECT m.valid_loss FROM metrics m WHERE m.job_id = c.job_id AND m.kind = ? "
            " AND m.step = c.step ORDER BY m.metric_id DESC LIMIT 1), "
            "(SELECT m.valid_accuracy FROM metrics m WHERE m.job_id = c.job_id AND m.kind = ? "
            " AND m.step = c.step ORDER BY m.metric_id DESC LIMIT 1) "
            "FROM checkpoints c WHERE c.job_id = ? ORDER BY c.step", (TRAIN, VALID, VALID, job_id))
        return [CheckpointInfo(step=r[0], path=r[1], created_s=r[2], train_loss=r[3],
                               valid_loss=r[4], valid_accuracy=r[5])
                for r in rows if os.path.isdir(r[1])]

    def last_metrics(self, job_id: int, n: int) -> list[JobMetric]:
        """The job's newest ``n`` metric events, oldest first."""
        rows = self.db.execute(
            f"SELECT {', '.join(_METRIC_COLUMNS)} FROM metrics "
            "WHERE job_id = ? ORDER BY metric_id DESC LIMIT ?", (job_id, n)).fetchall()
        return [_metric(r) for r in reversed(rows)]

    # -- writes ------------------------------------------------------------------------------

    def _event(self, job_id: int, kind: str, message: str) -> None:
        self.db.execute("INSERT INTO events (job_id, time_s, kind, message) VALUES (?, ?, ?, ?)",
                        (job_id, self.clock(), kind, message))

    def add_event(self, job_id: int, kind: str, message: str) -> None:
        self._event(job_id, kind, message)

    def add(self, spec: JobSpec, dataset_report: dict[str, Any] | None = None,
            owner: str = "") -> JobInfo:
        """Store a job, with its first event, in one transaction: queued with its dataset's
        report, or ``validating_files`` without one (``set_validated`` queues it)."""
        try:
            with self.db:
                self.db.execute("BEGIN")
                cur = self.db.execute(
                    "INSERT INTO jobs (name, spec, status, priority, created_s, dataset_report, "
                    "owner) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (spec.name, msgspec.json.encode(spec).decode(),
                     VALIDATING if dataset_report is None else QUEUED, spec.priority,
                     self.clock(), None if dataset_report is None else json.dumps(dataset_report),
                     owner))
                job_id = int(cur.lastrowid or 0)
                if dataset_report is None:
                    self._event(job_id, "attached", f"attached with priority {spec.priority}; "
                                f"validating its files")
                else:
                    self._event(job_id, "attached", _queued_message(spec, dataset_report))
        except sqlite3.IntegrityError:
            raise DuplicateJobName(spec.name) from None
        job = self.get(job_id)
        assert job is not None
        return job

    def set_validated(self, job_id: int, spec: JobSpec, dataset_report: dict[str, Any]) -> None:
        """A job whose files passed their checks: queued, with its dataset's report."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE jobs SET status = ?, dataset_report = ? WHERE job_id = ? "
                            "AND status = ?", (QUEUED, json.dumps(dataset_report), job_id,
                                               VALIDATING))
            self._event(job_id, "validated", _queued_message(spec, dataset_report))

    def validating(self) -> list[JobInfo]:
        """The jobs whose files are still to be checked, oldest first."""
        return self._select("WHERE status = ? ORDER BY job_id", (VALIDATING,))

    def set_status(self, job_id: int, status: str, kind: str, message: str,
                   error: str | None = None, adapter_path: str | None = None) -> None:
        now = self.clock()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "UPDATE jobs SET status = ?, error = COALESCE(?, error), "
                "adapter_path = COALESCE(?, adapter_path), "
                "started_s = CASE WHEN ? IN ('running', 'paused') THEN COALESCE(started_s, ?) "
                "ELSE started_s END, "
                "finished_s = CASE WHEN ? IN ('succeeded', 'failed', 'cancelled') THEN ? "
                "ELSE finished_s END WHERE job_id = ?",
                (status, error, adapter_path, status, now, status, now, job_id))
            self._event(job_id, kind, message)

    def record_start(self, job_id: int, total_steps: int, resumed_from_step: int | None,
                     dataset_report: dict[str, Any]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            step = resumed_from_step or 0
            self.db.execute(
                "UPDATE jobs SET total_steps = ?, step = ?, dataset_report = ? WHERE job_id = ?",
                (total_steps, step, json.dumps(dataset_report), job_id))
            # The steps past the checkpoint are trained again, and logged again.
            self.db.execute("DELETE FROM metrics WHERE job_id = ? AND step > ?", (job_id, step))
            self.db.execute("DELETE FROM checkpoints WHERE job_id = ? AND step > ?",
                            (job_id, step))
            self._event(job_id, "started",
                        f"resumed from checkpoint-{step}" if resumed_from_step
                        else f"started from scratch: {total_steps} steps")

    def record_progress(self, r: MicroStepReport, tokens_per_s: float | None) -> None:
        self.db.execute(
            "UPDATE jobs SET step = ?, total_steps = ?, epoch = ?, micro_steps = ?, tokens = ?, "
            "loss = ?, first_loss = COALESCE(first_loss, ?), level = ?, "
            "paused_s = paused_s + ?, tokens_per_s = ? WHERE job_id = ?",
            (r.step, r.total_steps, r.epoch, r.micro_step, r.tokens, r.loss, r.loss, r.level,
             r.paused_s, tokens_per_s, r.job_id))

    def set_fine_tuned_model(self, job_id: int, model: str) -> None:
        """The model name under which the job's adapter is served."""
        self.db.execute("UPDATE jobs SET fine_tuned_model = ? WHERE job_id = ?",
                        (model, job_id))

    def record_step(self, m: StepLogged) -> None:
        """A logged step, as a metric event."""
        self.db.execute(
            "INSERT INTO metrics (job_id, time_s, kind, step, epoch, tokens, train_loss, "
            "learning_rate, grad_norm, tokens_per_s, level) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (m.job_id, self.clock(), TRAIN, m.step, m.epoch, m.tokens, m.loss, m.learning_rate,
             m.grad_norm, m.tokens_per_s, m.level))

    def record_checkpoint(self, c: CheckpointSaved) -> None:
        """A checkpoint: the job's latest, an event, and its validation score (if any) as a
        metric event."""
        message = f"saved {c.path}"
        v = c.validation
        if v is not None:
            message += (f"; valid_loss {v.loss:.4f}, valid_accuracy {100 * v.accuracy:.1f} % "
                        f"({v.examples} examples, {v.duration_s:.1f} s)")
        elif c.validation_error:
            message += f"; not validated: {c.validation_error}"
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE jobs SET checkpoint_step = ? WHERE job_id = ?",
                            (c.step, c.job_id))
            self.db.execute("INSERT OR REPLACE INTO checkpoints (job_id, step, path, time_s) "
                            "VALUES (?, ?, ?, ?)", (c.job_id, c.step, c.path, self.clock()))
            self._event(c.job_id, "checkpoint", message)
            if v is not None:
                self.db.execute(
                    "INSERT INTO metrics (job_id, time_s, kind, step, epoch, tokens, "
                    "valid_loss, valid_accuracy, examples) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (c.job_id, self.clock(), VALID, c.step, c.epoch, v.tokens, v.loss,
                     v.accuracy, v.examples))

    def requeue_active(self, why: str) -> list[int]:
        """Put running/paused jobs back in the queue (their process died); they resume from
        their last checkpoint when started again."""
        ids = [j.job_id for j in self.active()]
        with self.db:
            self.db.execute("BEGIN")
            for job_id in ids:
                self.db.execute("UPDATE jobs SET status = ?, restarts = restarts + 1 "
                                "WHERE job_id = ?", (QUEUED, job_id))
                self._event(job_id, "requeued", why)
        return ids


def _queued_message(spec: JobSpec, report: dict[str, Any]) -> str:
    message = (f"queued with priority {spec.priority}; dataset {report.get('path')}: "
               f"{report.get('records')} records ({report.get('format')}), "
               f"{report.get('truncated')} truncated to {spec.max_seq_len} tokens")
    if "validation_path" in report:
        message += (f"; validation file {report['validation_path']}: "
                    f"{report.get('validation_records')} records")
    return message
