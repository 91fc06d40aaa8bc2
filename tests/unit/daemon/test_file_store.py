"""The uploaded files' records: in place or refused, by owner, removed with their bytes, and
what no record names swept at start."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from harli.daemon.file_store import FileRefused, FileStore
from harli.ipc.control import AddFile


@pytest.fixture
def files(tmp_path: Path) -> FileStore:
    return FileStore(sqlite3.connect(tmp_path / "jobs.sqlite", isolation_level=None),
                     tmp_path / "files", clock=lambda: 50.0)


def put(files: FileStore, file_id: str, owner: str = "", text: str = '{"text": "a"}\n') -> None:
    files.path(file_id).write_text(text)
    files.add(AddFile(file_id=file_id, filename="t.jsonl", purpose="fine-tune", owner=owner,
                      records=1, format="text"))


def test_added_files_survive_reopen_and_are_listed_by_owner(files: FileStore,
                                                           tmp_path: Path) -> None:
    put(files, "file-a", "k1")
    put(files, "file-b", "k2")
    assert [f.file_id for f in files.all("k1")] == ["file-a"]
    again = FileStore(sqlite3.connect(tmp_path / "jobs.sqlite", isolation_level=None),
                      tmp_path / "files")
    f = again.get("file-b")
    assert f is not None and (f.owner, f.size_bytes, f.created_s, f.format) == (
        "k2", 14, 50.0, "text")
    with pytest.raises(FileRefused, match="exists already"):
        put(files, "file-b")


def test_removing_a_file_deletes_its_bytes(files: FileStore) -> None:
    put(files, "file-a")
    gone = files.remove("file-a")
    assert gone is not None and not Path(gone.path).exists()
    assert files.get("file-a") is None and files.remove("file-a") is None


def test_the_sweep_removes_unfinished_uploads_and_unrecorded_files_only(
        files: FileStore) -> None:
    put(files, "file-a")
    (files.files_dir / ".upload-123.tmp").write_text("x")
    files.path("file-orphan").write_text("x")
    (files.files_dir / "README").write_text("not ours")
    assert files.sweep() == 2
    assert sorted(p.name for p in files.files_dir.iterdir()) == ["README", "file-a.jsonl"]
