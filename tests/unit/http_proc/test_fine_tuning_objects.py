"""OpenAI's fine-tuning shapes from and to Harli's jobs: a request's fields and Harli's own
options into a ``JobSpec`` (a bad one named), a job into a ``fine_tuning.job`` the openai SDK
parses, statuses, events newest first, checkpoints, and cursor pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from harli.http_proc.errors import ApiError
from harli.http_proc.fine_tuning_objects import (
    FineTuningJobRequest,
    build_spec,
    checkpoint_object,
    event_objects,
    file_ref,
    job_id_of,
    job_name,
    job_object,
    openai_status,
)
from harli.http_proc.pages import check_limit, page
from harli.ipc.control import CheckpointInfo, JobEvent, JobInfo, TrainMetric, ValidMetric
from harli.ipc.jobs import JobSpec

FILES = Path("/state/files")
TRAIN = "/state/files/file-abc123.jsonl"


def request(**kw: Any) -> FineTuningJobRequest:
    return FineTuningJobRequest(model="tiny", training_file="file-abc123", **kw)


def refused(**kw: Any) -> ApiError:
    with pytest.raises(ApiError) as e:
        build_spec(request(**kw), "ft-x-1", TRAIN)
    assert e.value.status == 400
    return e.value


def test_hyperparameters_map_onto_the_spec_and_auto_keeps_the_defaults() -> None:
    spec = build_spec(request(hyperparameters={"n_epochs": 3, "batch_size": 4,
                                               "learning_rate_multiplier": 0.5}, seed=7),
                      "ft-x-1", TRAIN, "/state/files/file-v.jsonl")
    assert (spec.name, spec.dataset, spec.validation_file) == (
        "ft-x-1", TRAIN, "/state/files/file-v.jsonl")
    assert (spec.epochs, spec.micro_batch_size, spec.seed) == (3, 4, 7)
    assert spec.learning_rate == pytest.approx(JobSpec(name="a", dataset="/d").learning_rate / 2)
    auto = build_spec(request(hyperparameters={"n_epochs": "auto", "batch_size": "auto",
                                               "learning_rate_multiplier": "auto"}),
                      "ft-x-1", TRAIN)
    assert auto == JobSpec(name="ft-x-1", dataset=TRAIN)
    # The same under method.supervised, as newer SDKs send them.
    via_method = build_spec(request(method={"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 3}}}), "ft-x-1", TRAIN)
    assert via_method.epochs == 3


def test_harli_options_reach_the_spec() -> None:
    spec = build_spec(request(harli={"max_steps": 6, "checkpoint_every": 3, "lora": {"r": 4},
                                     "publish_checkpoints": True}), "ft-x-1", TRAIN)
    assert (spec.max_steps, spec.checkpoint_every, spec.lora.r, spec.publish_checkpoints) == (
        6, 3, 4, True)


@pytest.mark.parametrize(("kw", "param", "words"), [
    ({"harli": {"max_steps": 0}}, "harli.max_steps", ">= 1"),
    ({"harli": {"lora": {"r": 0}}}, "harli.lora.r", ">= 1"),
    ({"harli": {"nope": 1}}, "harli.nope", "Unrecognized job option: harli.nope"),
    ({"harli": {"dataset": "/etc/passwd"}}, "harli.dataset", "training_file"),
    ({"harli": {"name": "x"}}, "harli.name", "suffix"),
    ({"harli": {"epochs": 2}, "hyperparameters": {"n_epochs": 3}}, "harli.epochs",
     "hyperparameters.n_epochs"),
    ({"hyperparameters": {"learning_rate_multiplier": 1000.0}},
     "hyperparameters.learning_rate_multiplier", "<= 1"),
])
def test_a_bad_option_is_a_400_naming_it(kw: dict[str, Any], param: str, words: str) -> None:
    e = refused(**kw)
    assert e.param == param and words in e.message and param in e.message, (e.param,
                                                                             e.message)
    assert "$." not in e.message


def test_unsupported_fields_are_named() -> None:
    assert request(method={"type": "dpo"}).unsupported()[0][0] == "method.type"
    assert request(integrations=[{"type": "wandb"}]).unsupported()[0][0] == "integrations"
    assert request(hyperparameters={"n_epochs": 1}, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}
    ).unsupported()[0][0] == "hyperparameters"
    assert request(seed=1, suffix="my-model").unsupported() == []


def test_ids_names_and_statuses() -> None:
    assert job_id_of("ftjob-12") == 12
    # Only the id as written: "ftjob-²" once raised (a 500), "ftjob-١٢" named job 12.
    for bad in ("ftjob-", "ftjob-0", "ftjob-x", "12", "ftjob--1", "ftjob-" + "9" * 30,
                "ftjob-²", "ftjob-١٢", "ftjob-012", "ftjob-12\n", " ftjob-12", "ftjob-+12",
                "ftjob-1_2"):
        assert job_id_of(bad) is None
    assert job_name("my-model", "tiny", "ab12") == "ft-my-model-ab12"
    assert job_name(None, "Qwen/Qwen2.5 0.5B", "ab12") == "ft-Qwen-Qwen2.5-0.5B-ab12"
    assert msgspec.convert({"name": job_name(None, "///", "ab12"), "dataset": "/d"}, JobSpec)
    assert [openai_status(s) for s in ("queued", "running", "paused", "held", "succeeded",
                                       "failed", "cancelled")] == [
        "queued", "running", "running", "paused", "succeeded", "failed", "cancelled"]
    assert file_ref(TRAIN, FILES) == "file-abc123"
    assert file_ref("/data/train.jsonl", FILES) == "/data/train.jsonl"
    assert file_ref("", FILES) is None


def job(**kw: Any) -> JobInfo:
    fields: dict[str, Any] = dict(
        job_id=3, name="ft-x-1", status="running", priority=0, created_s=1000.5,
        started_s=1010.0, finished_s=None, step=5, total_steps=10, epoch=0, micro_steps=5,
        tokens=500, loss=1.5, first_loss=2.0, level=2, paused_s=0.0, tokens_per_s=100.0,
        checkpoint_step=None, restarts=0, error=None, adapter_path=None, dataset_report=None,
        spec=JobSpec(name="ft-x-1", dataset=TRAIN, seed=4, epochs=2), owner="k1")
    fields.update(kw)
    return JobInfo(**fields)


def test_a_job_object_parses_with_the_sdk_and_says_what_the_job_is() -> None:
    running = FineTuningJob.model_validate(job_object(job(), "tiny", FILES, now=1020.0))
    assert (running.id, running.status, running.model, running.training_file) == (
        "ftjob-3", "running", "tiny", "file-abc123")
    assert running.fine_tuned_model is None and running.finished_at is None
    assert running.trained_tokens is None and running.error is None
    assert running.estimated_finish == 1030  # 5 steps in 10 s, 5 to go
    assert running.hyperparameters.n_epochs == 2 and running.seed == 4
    done = FineTuningJob.model_validate(job_object(
        job(status="succeeded", finished_s=1100.9, step=10, fine_tuned_model="ft-x-1"),
        "tiny", FILES, now=1200.0))
    assert (done.status, done.fine_tuned_model, done.finished_at, done.trained_tokens) == (
        "succeeded", "ft-x-1", 1100, 500)
    assert done.estimated_finish is None
    failed = FineTuningJob.model_validate(job_object(
        job(status="failed", finished_s=1100.0, error="micro-step 3: boom"), "tiny", FILES,
        now=1200.0))
    assert failed.error is not None and failed.error.message == "micro-step 3: boom"
    held = job_object(job(status="held"), "tiny", FILES, now=1200.0)
    assert held["status"] == "paused" and held["harli"]["status"] == "held"


def test_events_are_message_and_metrics_events_newest_first() -> None:
    events = [JobEvent(event_id=1, job_id=3, time_s=100.0, kind="attached", message="queued"),
              JobEvent(event_id=2, job_id=3, time_s=103.0, kind="requeued", message="died"),
              JobEvent(event_id=3, job_id=3, time_s=105.0, kind="failed", message="boom")]
    metrics = [TrainMetric(metric_id=7, job_id=3, time_s=103.0, step=1, epoch=0.1,
                           train_loss=2.5, learning_rate=1e-3, grad_norm=0.5, tokens=10,
                           tokens_per_s=50.0, level=2),
               ValidMetric(metric_id=8, job_id=3, time_s=104.0, step=1, epoch=0.1,
                           valid_loss=2.25, valid_accuracy=0.5, examples=4, tokens=20)]
    out = event_objects(events, metrics, total_steps=6)
    assert [e["id"] for e in out] == ["ftevent-3", "ftevent-m8", "ftevent-m7", "ftevent-2",
                                      "ftevent-1"]
    parsed = [FineTuningJobEvent.model_validate(e) for e in out]
    assert [(e.type, e.level) for e in parsed] == [
        ("message", "error"), ("metrics", "info"), ("metrics", "info"), ("message", "warn"),
        ("message", "info")]
    assert parsed[2].message == "Step 1/6: training loss=2.5000"
    assert out[2]["data"]["train_loss"] == 2.5 and out[1]["data"]["valid_loss"] == 2.25


def test_a_checkpoint_object_names_its_served_model_or_its_directory() -> None:
    published = CheckpointInfo(step=6, path="/o/checkpoint-6", created_s=99.5,
                               served_as="ft-x-1@step-6", train_loss=1.0, valid_loss=1.2)
    c = FineTuningJobCheckpoint.model_validate(checkpoint_object(3, published))
    assert (c.id, c.fine_tuned_model_checkpoint, c.fine_tuning_job_id, c.step_number) == (
        "ftckpt-3-6", "ft-x-1@step-6", "ftjob-3", 6)
    assert c.metrics.train_loss == 1.0 and c.metrics.valid_loss == 1.2
    plain = checkpoint_object(3, CheckpointInfo(step=3, path="/o/checkpoint-3", created_s=1.0))
    assert plain["fine_tuned_model_checkpoint"] == "/o/checkpoint-3"


def test_pages_follow_the_cursor_and_say_whether_there_is_more() -> None:
    items = [f"x{i}" for i in range(5)]

    def ids(p: dict[str, Any]) -> list[str]:
        return [d["id"] for d in p["data"]]

    def cut(after: str | None, limit: int) -> dict[str, Any]:
        return page(items, lambda x: x, after, limit, lambda x: {"id": x})

    first = cut(None, 2)
    assert ids(first) == ["x0", "x1"] and first["has_more"] and first["last_id"] == "x1"
    last = cut("x3", 2)
    assert ids(last) == ["x4"] and not last["has_more"]
    assert ids(cut("gone", 2)) == [] and cut("x4", 2)["first_id"] is None
    assert check_limit(100, 100) == 100
    with pytest.raises(ApiError) as e:
        check_limit(101, 100)
    assert e.value.param == "limit"
