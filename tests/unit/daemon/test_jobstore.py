"""The SQLite job store: all-or-nothing adds, priority order, absolute progress, requeue."""

from __future__ import annotations

from pathlib import Path

import pytest

from harli.daemon.jobstore import DuplicateJobName, JobStore
from harli.ipc.finetune import MicroStepReport
from harli.ipc.jobs import JobSpec

REPORT = {"path": "/d.jsonl", "format": "text", "records": 3, "truncated": 1, "tokens": 9,
          "loss_tokens": 9}


def spec(name: str, priority: int = 0) -> JobSpec:
    return JobSpec(name=name, dataset="/d.jsonl", output_dir=f"/o/{name}", priority=priority)


def report(job_id: int, step: int, tokens: int, paused_s: float = 0.0) -> MicroStepReport:
    return MicroStepReport(job_id=job_id, micro_step=step, step=step, epoch=0, tokens=tokens,
                           step_tokens=10, duration_s=0.1, level=2, loss=1.0 / step,
                           paused_s=paused_s, total_steps=10)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite", clock=lambda: 100.0)


def test_add_is_queued_with_an_event_and_survives_reopen(store: JobStore, tmp_path: Path) -> None:
    job = store.add(spec("a"), REPORT)
    assert job.status == "queued" and job.dataset_report == REPORT
    assert [e.kind for e in store.events(job.job_id)] == ["attached"]
    store.close()
    again = JobStore(tmp_path / "jobs.sqlite")
    assert again.get(job.job_id) == job
    assert again.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_duplicate_name_stores_nothing(store: JobStore) -> None:
    store.add(spec("a"), REPORT)
    with pytest.raises(DuplicateJobName):
        store.add(spec("a"), REPORT)
    assert len(store.all_jobs()) == 1
    assert store.db.execute("SELECT count(*) FROM events").fetchone()[0] == 1


def test_next_queued_by_priority_then_arrival(store: JobStore) -> None:
    a = store.add(spec("a", 0), REPORT)
    b = store.add(spec("b", 5), REPORT)
    c = store.add(spec("c", 5), REPORT)
    assert store.next_queued() == b
    store.set_status(b.job_id, "running", "scheduled", "x")
    assert store.next_queued().job_id == c.job_id  # type: ignore[union-attr]
    store.set_status(c.job_id, "cancelled", "cancelled", "x")
    assert store.next_queued().job_id == a.job_id  # type: ignore[union-attr]


def test_progress_is_absolute_so_a_replay_counts_nothing_twice(store: JobStore) -> None:
    job = store.add(spec("a"), REPORT)
    for step in (1, 2, 3):
        store.record_progress(report(job.job_id, step, 10 * step, paused_s=0.5), 50.0)
    store.record_progress(report(job.job_id, 3, 30), 50.0)  # the same report again
    j = store.get(job.job_id)
    assert j is not None
    assert (j.step, j.micro_steps, j.tokens) == (3, 3, 30)
    assert j.first_loss == 1.0 and j.loss == pytest.approx(1 / 3)
    assert j.paused_s == pytest.approx(1.5)


def test_requeue_active_after_a_crash(store: JobStore) -> None:
    a = store.add(spec("a"), REPORT)
    b = store.add(spec("b"), REPORT)
    store.set_status(a.job_id, "running", "scheduled", "x")
    store.record_checkpoint(a.job_id, 20, "/o/a/checkpoint-20")
    assert store.requeue_active("finetune died") == [a.job_id]
    j = store.get(a.job_id)
    assert j is not None and j.status == "queued" and j.restarts == 1
    assert j.checkpoint_step == 20 and store.get(b.job_id).restarts == 0  # type: ignore[union-attr]
    store.record_start(a.job_id, 100, 20, REPORT)
    assert store.get(a.job_id).step == 20  # type: ignore[union-attr]
    assert store.events(a.job_id)[-1].message == "resumed from checkpoint-20"


def test_terminal_status_sets_finished_time(store: JobStore) -> None:
    a = store.add(spec("a"), REPORT)
    store.set_status(a.job_id, "running", "scheduled", "x")
    store.set_status(a.job_id, "succeeded", "succeeded", "done", adapter_path="/o/a/adapter")
    j = store.get(a.job_id)
    assert j is not None and j.started_s == 100.0 and j.finished_s == 100.0
    assert j.adapter_path == "/o/a/adapter"


def test_a_store_written_before_fine_tuned_model_gets_the_column(tmp_path: Path) -> None:
    import sqlite3

    from harli.daemon import jobstore

    old = jobstore._SCHEMA.replace(",\n    fine_tuned_model TEXT", "")
    assert "fine_tuned_model" not in old
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.executescript(old)
    db.close()
    s = JobStore(tmp_path / "old.sqlite")
    job = s.add(spec("a"), {})
    assert job.fine_tuned_model is None
    s.set_fine_tuned_model(job.job_id, "a")
    assert s.get(job.job_id).fine_tuned_model == "a"  # type: ignore[union-attr]
    s.close()
    assert JobStore(tmp_path / "old.sqlite").get(job.job_id).fine_tuned_model == "a"  # type: ignore[union-attr]
