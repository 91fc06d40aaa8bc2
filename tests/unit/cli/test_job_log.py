"""``harli job logs|show|plot`` on a fake control client: events and metric events in one time
order, a line or a JSON object each; the loss curve's PNG, and one-line errors without it;
``harli attach --validation-file``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from harli.cli import job_log, jobs
from harli.ipc.control import JobDetail, JobEvent, JobInfo, JobMetric, TrainMetric, ValidMetric
from harli.ipc.jobs import JobSpec

SPEC = JobSpec(name="digits", dataset="/d.jsonl", validation_file="/v.jsonl", log_every=1)
JOB = JobInfo(job_id=3, name="digits", status="succeeded", priority=0, created_s=1.0,
              started_s=2.0, finished_s=9.0, step=4, total_steps=4, epoch=0, micro_steps=4,
              tokens=256, loss=0.5, first_loss=2.0, level=2, paused_s=0.0, tokens_per_s=900.0,
              checkpoint_step=4, restarts=0, error=None, adapter_path="/o/adapter",
              dataset_report=None, spec=SPEC, valid_loss=0.75, valid_accuracy=0.625)


def event(event_id: int, time_s: float, kind: str, message: str) -> JobEvent:
    return JobEvent(event_id=event_id, job_id=3, time_s=time_s, kind=kind, message=message)


def train(metric_id: int, time_s: float, step: int, loss: float | None) -> TrainMetric:
    return TrainMetric(metric_id=metric_id, job_id=3, time_s=time_s, step=step,
                       epoch=step / 10, train_loss=loss, learning_rate=1e-3, grad_norm=0.5,
                       tokens=64 * step, tokens_per_s=4567.4, level=2)


def valid(metric_id: int, time_s: float, step: int) -> ValidMetric:
    return ValidMetric(metric_id=metric_id, job_id=3, time_s=time_s, step=step,
                       epoch=step / 10, valid_loss=0.75, valid_accuracy=0.625, examples=16,
                       tokens=80)


EVENTS = [event(1, 1.0, "attached", "queued"), event(7, 2.5, "checkpoint", "saved /o/c-2"),
          event(9, 9.0, "succeeded", "finished")]
METRICS: list[JobMetric] = [train(1, 2.0, 1, 1.234), train(2, 2.5, 2, None),
                            valid(3, 2.5, 2), train(4, 3.0, 3, 0.5)]


class FakeClient:
    """``ControlClient``'s job reads, over fixed lists (``logs`` pages of ``page`` entries)."""

    def __init__(self, metrics: list[JobMetric], page: int = 2) -> None:
        self.metrics = metrics
        self.page = page

    def show(self, job_id: int) -> JobDetail:
        return JobDetail(job=JOB, events=EVENTS[-2:], metrics=self.metrics[-1:])

    def logs(self, job_id: int, after_event: int = 0, after_metric: int = 0,
             limit: int = 10_000) -> JobDetail:
        ev = [e for e in EVENTS if e.event_id > after_event]
        me = [m for m in self.metrics if m.metric_id > after_metric]
        return JobDetail(job=JOB, events=ev[:self.page], metrics=me[:self.page],
                         truncated=len(ev) > self.page or len(me) > self.page)

    def all_logs(self, job_id: int, after_event: int = 0, after_metric: int = 0) -> JobDetail:
        from harli.client.control import ControlClient

        return ControlClient.all_logs(self, job_id, after_event, after_metric)  # type: ignore[arg-type]


def test_metric_lines_and_the_merged_time_order() -> None:
    assert job_log.describe(METRICS[0]) == "step 1: train_loss 1.234, 4567 tok/s, level 2"
    assert job_log.describe(METRICS[1]) == "step 2: train_loss -, 4567 tok/s, level 2"
    assert job_log.describe(METRICS[2]) == ("step 2: valid_loss 0.750, valid_accuracy 62.5 % "
                                            "(16 examples)")
    assert job_log.describe(EVENTS[0]) == "attached: queued"
    merged = job_log.merge(EVENTS, METRICS)
    # By time; at a tie the event first, then by id.
    assert [(type(e).__name__, e.time_s) for e in merged] == [
        ("JobEvent", 1.0), ("TrainMetric", 2.0), ("JobEvent", 2.5), ("TrainMetric", 2.5),
        ("ValidMetric", 2.5), ("TrainMetric", 3.0), ("JobEvent", 9.0)]


def test_logs_pages_through_everything_and_prints_it_in_time_order(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert jobs._logs(FakeClient(METRICS), 3, as_json=False, follow=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "attached: queued", "step 1: train_loss 1.234, 4567 tok/s, level 2",
        "checkpoint: saved /o/c-2", "step 2: train_loss -, 4567 tok/s, level 2",
        "step 2: valid_loss 0.750, valid_accuracy 62.5 % (16 examples)",
        "step 3: train_loss 0.500, 4567 tok/s, level 2", "succeeded: finished"]
    assert jobs._logs(FakeClient(METRICS), 3, as_json=True, follow=False) == 0
    objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["type"] for o in objects] == ["event", "train_metric", "event", "train_metric",
                                            "valid_metric", "train_metric", "event"]
    assert objects[1] == msgspec.to_builtins(METRICS[0])


def test_show_json_has_every_metric_event(capsys: pytest.CaptureFixture[str]) -> None:
    assert jobs._show(FakeClient(METRICS, page=1), 3, as_json=True) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [m["metric_id"] for m in shown["metrics"]] == [1, 2, 3, 4]
    assert [e["event_id"] for e in shown["events"]] == [7, 9]  # the recent ones, as show_job
    assert shown["job"]["valid_loss"] == 0.75
    assert jobs._show(FakeClient(METRICS), 3, as_json=False) == 0
    text = capsys.readouterr().out
    assert "validation (latest checkpoint): valid_loss 0.750, valid_accuracy 62.5 %" in text


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "loss.png"
    assert jobs._plot(FakeClient(METRICS), 3, out) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"loss curve of job 3: {out}\n"


def test_plot_of_a_job_with_no_loss_yet_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert jobs._plot(FakeClient([train(1, 2.0, 1, None)]), 3, tmp_path / "x.png") == 1
    err = capsys.readouterr().err
    assert err == ("harli job plot: job 3 (succeeded) has no loss logged yet; it logs one "
                   "every 1 optimizer step(s)\n")
    assert not (tmp_path / "x.png").exists()


def test_plot_without_matplotlib_says_how_to_get_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from harli.bench import plotting

    def unavailable() -> Any:
        raise plotting.PlotsUnavailable("plots need matplotlib, which is not installed "
                                        f"({plotting.INSTALL_HINT})")

    monkeypatch.setattr(plotting, "pyplot", unavailable)
    assert jobs._plot(FakeClient(METRICS), 3, tmp_path / "x.png") == 1
    assert "harli[plots]" in capsys.readouterr().err


def test_attach_takes_a_validation_file_as_an_absolute_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harli.cli.attach import AttachCommand, build_spec

    monkeypatch.chdir(tmp_path)
    p = argparse.ArgumentParser()
    AttachCommand().add_arguments(p)
    spec = build_spec(p.parse_args(["train.jsonl", "--validation-file", "valid.jsonl",
                                    "--log-every", "5"]))
    assert spec.validation_file == str(tmp_path / "valid.jsonl")
    assert spec.log_every == 5
    assert build_spec(p.parse_args(["train.jsonl"])).validation_file == ""
