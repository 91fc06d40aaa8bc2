"""A job's log as ``harli job logs`` prints it: its events and metric events in one time order,
one line (or one JSON object) each."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from harli.ipc.control import JobEvent, JobMetric, TrainMetric, ValidMetric

LogEntry = JobEvent | JobMetric


def merge(events: list[JobEvent], metrics: list[JobMetric]) -> list[LogEntry]:
    """Both lists in one, by the time the daemon stored each (ties: events first, then by
    id); each list is already in its own id order."""
    entries: list[LogEntry] = [*events, *metrics]
    return sorted(entries, key=lambda e: (e.time_s, not isinstance(e, JobEvent), _id(e)))


def _id(e: LogEntry) -> int:
    return e.event_id if isinstance(e, JobEvent) else e.metric_id


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def describe(e: LogEntry) -> str:
    """What the entry says, without its time."""
    if isinstance(e, TrainMetric):
        return (f"step {e.step}: train_loss {_num(e.train_loss, '.3f')}, "
                f"{e.tokens_per_s:.0f} tok/s, level {e.level}")
    if isinstance(e, ValidMetric):
        return (f"step {e.step}: valid_loss {e.valid_loss:.3f}, valid_accuracy "
                f"{100 * e.valid_accuracy:.1f} % ({e.examples} examples)")
    return f"{e.kind}: {e.message}"


def line(e: LogEntry) -> str:
    """``HH:MM:SS`` (local time) and what the entry says."""
    return f"{time.strftime('%H:%M:%S', time.localtime(e.time_s))} {describe(e)}"


def jsonable(e: LogEntry) -> Any:
    """The entry as the protocol's map (``type`` says which kind), for ``--json``."""
    return msgspec.to_builtins(e)
