"""Uploaded dataset files: their records in the job store's SQLite file, their bytes in
``<state_dir>/files/<file_id>.jsonl``.

The HTTP front writes an upload there itself (a temporary name in the same directory, checked,
fsynced, renamed), then registers it with ``AddFile``: the bytes never cross the control
socket, whose messages are bounded by ``endpoints.max_message_bytes``. Registering checks that
the file is where its id says, a regular file; the record keeps who uploaded it. A job names
the file by its path (``JobSpec.dataset``), so a file is not removed while a job that has not
ended uses it: the finetune reads it again when the job starts or resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harli.datasets import UPLOAD_SUFFIX, UPLOAD_TEMP_PREFIX, upload_path
from harli.ipc.control import AddFile, FileInfo

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    file_id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    owner TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_s REAL NOT NULL,
    records INTEGER NOT NULL,
    format TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_owner ON files(owner, created_s);
"""
_COLUMNS = ("file_id", "filename", "purpose", "owner", "size_bytes", "created_s", "records",
            "format")


class FileRefused(Exception):
    """An ``AddFile`` that cannot be registered; the message says why."""


class FileStore:
    def __init__(self, db: sqlite3.Connection, files_dir: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.files_dir = files_dir
        self.clock = clock
        files_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db.executescript(_SCHEMA)

    def path(self, file_id: str) -> Path:
        return upload_path(self.files_dir, file_id)

    def _info(self, row: tuple[Any, ...]) -> FileInfo:
        d = dict(zip(_COLUMNS, row, strict=True))
        return FileInfo(**d, path=str(self.path(d["file_id"])))

    def get(self, file_id: str) -> FileInfo | None:
        rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM files WHERE file_id = ?",
                               (file_id,)).fetchall()
        return self._info(rows[0]) if rows else None

    def all(self, owner: str | None = None) -> list[FileInfo]:
        """Every file, oldest first; ``owner``: only the files it uploaded."""
        select = f"SELECT {', '.join(_COLUMNS)} FROM files"
        rows = (self.db.execute(f"{select} ORDER BY created_s, file_id") if owner is None else
                self.db.execute(f"{select} WHERE owner = ? ORDER BY created_s, file_id",
                                (owner,)))
        return [self._info(r) for r in rows]

    def add(self, msg: AddFile) -> FileInfo:
        """Record a file the HTTP front has put in place; ``FileRefused`` when it is not there
        as a regular file, or the id is taken."""
        path = self.path(msg.file_id)
        try:
            st = os.lstat(path)  # lstat: a symlink could point anywhere
        except FileNotFoundError:
            raise FileRefused(f"{path} does not exist; write the upload there first") from None
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{path} is not a regular file")
        try:
            with self.db:
                self.db.execute("BEGIN")
                self.db.execute(
                    f"INSERT INTO files ({', '.join(_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (msg.file_id, msg.filename, msg.purpose, msg.owner, st.st_size,
                     self.clock(), msg.records, msg.format))
        except sqlite3.IntegrityError:
            raise FileRefused(f"a file with id {msg.file_id} exists already") from None
        added = self.get(msg.file_id)
        assert added is not None
        logger.info("[files] %s: %r, %d bytes, %d %s records", msg.file_id, msg.filename,
                    st.st_size, msg.records, msg.format)
        return added

    def remove(self, file_id: str) -> FileInfo | None:
        """Forget the file and delete its bytes; None when there is no such file."""
        gone = self.get(file_id)
        if gone is None:
            return None
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM files WHERE file_id = ?", (file_id,))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(gone.path)
        logger.info("[files] %s removed", file_id)
        return gone

    def sweep(self) -> int:
        """At start, before the HTTP front runs: delete what no record names (an upload the
        front had not finished, or one whose registration never happened). Returns the count."""
        known = {f.file_id for f in self.all()}
        removed = 0
        for entry in self.files_dir.iterdir():
            stray = entry.name.startswith(UPLOAD_TEMP_PREFIX) or (
                entry.name.endswith(UPLOAD_SUFFIX)
                and entry.name[:-len(UPLOAD_SUFFIX)] not in known)
            if stray and entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.info("[files] removed %d file(s) no record names", removed)
        return removed
