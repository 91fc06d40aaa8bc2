"""The adapter registry: every servable LoRA adapter by name, in the job store's SQLite file.

A servable model is the base model or a registered adapter. A job that succeeds registers its
adapter under the job's name; a job that publishes checkpoints registers each as
``NAME@step-N``; ``harli adapter add`` registers any PEFT adapter directory of the served base
model. Each adapter gets vLLM's ``lora_int_id`` once and for ever (SQLite AUTOINCREMENT never
reuses one), so a name removed and added again can never be served another adapter's cached
weights. The registry survives restarts with the database; decode loads an adapter from its
path when it is first asked for.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from harli.adapters import AdapterInfo

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    lora_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    source TEXT NOT NULL,
    job_id INTEGER,
    step INTEGER,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    base_model TEXT NOT NULL,
    created_s REAL NOT NULL
);
"""
_COLUMNS = ("lora_id", "name", "path", "source", "job_id", "step", "rank", "alpha",
            "base_model", "created_s")


class DuplicateAdapter(Exception):
    pass


@dataclass(frozen=True)
class Adapter:
    lora_id: int  # vLLM's lora_int_id, never reused
    name: str
    path: str
    source: str  # "job", "checkpoint" or "path"
    job_id: int | None
    step: int | None  # a checkpoint's optimizer step
    rank: int
    alpha: float
    base_model: str
    created_s: float


class AdapterRegistry:
    def __init__(self, db: sqlite3.Connection, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        db.executescript(_SCHEMA)

    def get(self, name: str) -> Adapter | None:
        rows = self._select("WHERE name = ?", (name,))
        return rows[0] if rows else None

    def all(self) -> list[Adapter]:
        return self._select("ORDER BY lora_id")

    def names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM adapters ORDER BY lora_id")]

    def add(self, name: str, info: AdapterInfo, source: str, job_id: int | None = None,
            step: int | None = None) -> Adapter:
        try:
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute(
                    "INSERT INTO adapters (name, path, source, job_id, step, rank, alpha, "
                    "base_model, created_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, info.path, source, job_id, step, info.rank, info.alpha,
                     info.base_model, self.clock()))
        except sqlite3.IntegrityError:
            raise DuplicateAdapter(name) from None
        added = self.get(name)
        assert added is not None
        return added

    def remove(self, name: str) -> Adapter | None:
        gone = self.get(name)
        if gone is not None:
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute("DELETE FROM adapters WHERE name = ?", (name,))
        return gone

    def _select(self, where: str, args: tuple[object, ...] = ()) -> list[Adapter]:
        rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM adapters {where}", args)
        return [Adapter(*r) for r in rows]
