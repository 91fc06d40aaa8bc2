"""The SQLite job store: all-or-nothing adds, priority order, absolute progress, requeue, metric
events (paged, dropped past a resume's checkpoint), and older stores opened as they are."""

from __future__ import annotations

from pathlib import Path

import pytest

from harli.daemon.jobstore import DuplicateJobName, JobStore
from harli.ipc.control import TrainMetric, ValidMetric
from harli.ipc.finetune import CheckpointSaved, MicroStepReport, StepLogged, ValidationScore
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
    store.record_checkpoint(CheckpointSaved(job_id=a.job_id, step=20,
                                            path="/o/a/checkpoint-20"))
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


def logged(job_id: int, step: int, loss: float | None = 1.0) -> StepLogged:
    return StepLogged(job_id=job_id, step=step, epoch=step / 10, loss=loss,
                      learning_rate=1e-3, grad_norm=0.5, tokens=100 * step,
                      tokens_per_s=2000.0, level=2)


def scored(job_id: int, step: int, loss: float) -> CheckpointSaved:
    return CheckpointSaved(job_id=job_id, step=step, path=f"/o/checkpoint-{step}",
                           epoch=step / 10, validation=ValidationScore(
                               loss=loss, accuracy=0.5, examples=16, tokens=80, duration_s=0.2))


def test_metric_events_are_typed_paged_and_give_the_latest_validation(store: JobStore) -> None:
    a = store.add(spec("a"), REPORT)
    b = store.add(spec("b"), REPORT)
    for step in (1, 2):
        store.record_step(logged(a.job_id, step, loss=1.0 / step))
    store.record_step(logged(b.job_id, 1))
    store.record_checkpoint(scored(a.job_id, 2, 0.75))
    store.record_step(logged(a.job_id, 3, loss=None))  # no label token in the interval
    got = store.metrics(a.job_id)
    assert [type(m) for m in got] == [TrainMetric, TrainMetric, ValidMetric, TrainMetric]
    first, _, valid, last = got
    assert isinstance(first, TrainMetric) and isinstance(valid, ValidMetric)
    assert (first.step, first.epoch, first.train_loss, first.learning_rate, first.grad_norm,
            first.tokens, first.tokens_per_s, first.level, first.time_s) == (
        1, 0.1, 1.0, 1e-3, 0.5, 100, 2000.0, 2, 100.0)
    assert (valid.step, valid.epoch, valid.valid_loss, valid.valid_accuracy, valid.examples,
            valid.tokens) == (2, 0.2, 0.75, 0.5, 16, 80)
    assert isinstance(last, TrainMetric) and last.train_loss is None
    # Paged by id, each job its own.
    assert store.metrics(a.job_id, after=got[1].metric_id, limit=1) == [valid]
    assert store.metrics(a.job_id, after=got[-1].metric_id) == []
    assert store.last_metrics(a.job_id, 2) == got[2:]
    assert [m.step for m in store.metrics(b.job_id)] == [1]
    # The job's summary holds the latest checkpoint's score; the checkpoint event says it.
    j = store.get(a.job_id)
    assert j is not None and (j.valid_loss, j.valid_accuracy) == (0.75, 0.5)
    assert store.get(b.job_id).valid_loss is None  # type: ignore[union-attr]
    assert "valid_loss 0.7500, valid_accuracy 50.0 %" in store.events(a.job_id)[-1].message
    assert store.events(a.job_id, limit=1)[0].kind == "attached"


def test_a_checkpoint_not_validated_says_why_and_stores_no_score(store: JobStore) -> None:
    a = store.add(spec("a"), REPORT)
    store.record_checkpoint(CheckpointSaved(job_id=a.job_id, step=5, path="/o/checkpoint-5",
                                            validation_error="given up: stopped while paused"))
    assert store.metrics(a.job_id) == []
    assert store.events(a.job_id)[-1].message == (
        "saved /o/checkpoint-5; not validated: given up: stopped while paused")


def test_a_resume_drops_the_metric_events_past_its_checkpoint(store: JobStore) -> None:
    a = store.add(spec("a"), REPORT)
    for step in range(1, 13):
        store.record_step(logged(a.job_id, step))
        if step % 5 == 0:
            store.record_checkpoint(scored(a.job_id, step, 1.0 / step))
    store.record_start(a.job_id, 20, 10, REPORT)  # died at step 12; resumes from 10
    assert max(m.step for m in store.metrics(a.job_id)) == 10
    assert store.get(a.job_id).valid_loss == pytest.approx(0.1)  # type: ignore[union-attr]
    store.record_start(a.job_id, 20, None, REPORT)  # no checkpoint: from scratch
    assert store.metrics(a.job_id) == []
    assert store.get(a.job_id).valid_loss is None  # type: ignore[union-attr]


def test_a_store_written_before_metric_events_gets_the_table(tmp_path: Path) -> None:
    import sqlite3

    from harli.daemon import jobstore

    old = jobstore._SCHEMA[:jobstore._SCHEMA.index("CREATE TABLE IF NOT EXISTS metrics")]
    old = old.replace(",\n    fine_tuned_model TEXT", "")
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.executescript(old)
    db.execute("INSERT INTO jobs (name, spec, status, priority, created_s) VALUES "
               "('a', '{\"name\": \"a\", \"dataset\": \"/d.jsonl\"}', 'succeeded', 0, 1.0)")
    db.commit()
    db.close()
    s = JobStore(tmp_path / "old.sqlite")
    (job,) = s.all_jobs()
    assert job.valid_loss is None and s.metrics(job.job_id) == []
    assert job.spec.validation_file == "" and job.spec.log_every == 1  # an older spec's defaults
    s.record_step(logged(job.job_id, 1))
    s.record_checkpoint(scored(job.job_id, 1, 0.5))
    s.close()
    again = JobStore(tmp_path / "old.sqlite")
    assert [type(m) for m in again.metrics(job.job_id)] == [TrainMetric, ValidMetric]
    assert again.get(job.job_id).valid_loss == 0.5  # type: ignore[union-attr]


def test_a_store_written_before_owners_gets_the_column_and_old_jobs_belong_to_no_key(
        tmp_path: Path) -> None:
    import sqlite3

    from harli.daemon import jobstore

    old = jobstore._SCHEMA.replace(",\n    owner TEXT NOT NULL DEFAULT ''", "")
    assert "owner" not in old
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.executescript(old)
    db.execute("INSERT INTO jobs (name, spec, status, priority, created_s) VALUES "
               "('a', '{\"name\": \"a\", \"dataset\": \"/d.jsonl\"}', 'queued', 0, 1.0)")
    db.commit()
    db.close()
    s = JobStore(tmp_path / "old.sqlite")
    (job,) = s.all_jobs()
    assert job.owner == ""
    b = s.add(spec("b"), {}, owner="k1")
    assert [j.name for j in s.all_jobs("k1")] == ["b"] and b.owner == "k1"
    assert [j.name for j in s.all_jobs("")] == ["a"]


def test_checkpoints_are_those_still_on_disk_with_their_steps_metrics(
        store: JobStore, tmp_path: Path) -> None:
    a = store.add(spec("a"), REPORT)
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        store.record_step(logged(a.job_id, step, loss=1.0 / step))
        store.record_checkpoint(CheckpointSaved(
            job_id=a.job_id, step=step, path=str(tmp_path / f"checkpoint-{step}"),
            validation=ValidationScore(loss=2.0 / step, accuracy=0.5, examples=4, tokens=8,
                                       duration_s=0.1) if step == 4 else None))
    (tmp_path / "checkpoint-2").rmdir()  # pruned (keep_checkpoints)
    got = store.checkpoints(a.job_id)
    assert [(c.step, c.train_loss, c.valid_loss, c.created_s) for c in got] == [
        (4, 0.25, 0.5, 100.0), (6, 1 / 6, None, 100.0)]
    store.record_start(a.job_id, 10, 4, REPORT)  # resumed from checkpoint-4
    assert [c.step for c in store.checkpoints(a.job_id)] == [4]
