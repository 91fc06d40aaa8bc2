"""JobManager's side of the dataset: tokenized once at attach into the cache the finetune
reads, a finetune that had to tokenize again counted, entries no job needs removed."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from harli.config import HarliConfig, load
from harli.daemon.disabled import NullChild
from harli.daemon.job_manager import ATTACH_REPLY_SHARE, JobManager, Reply
from harli.daemon.metrics import Metrics
from harli.daemon.quota import QuotaController
from harli.datasets import SAMPLE_DATASET
from harli.ipc.control import AttachJob, JobInfo
from harli.ipc.finetune import JobEnded, JobStarted
from harli.ipc.inference import Error
from harli.ipc.jobs import JobSpec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harli.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0)


@pytest.fixture
def jm(tmp_path: Path, tiny: Path) -> JobManager:
    cfg: HarliConfig = load(None, [f'daemon.runtime_dir="{tmp_path / "run"}"',
                                   f'daemon.state_dir="{tmp_path / "state"}"',
                                   f'model.path="{tiny}"', "memory.arena=false"])
    (tmp_path / "state").mkdir()
    send = lambda m: True  # noqa: E731
    metrics = Metrics()
    quota = QuotaController(cfg.finetune, send, NullChild("finetune"), None, metrics)
    manager = JobManager(cfg, send, metrics, quota)
    yield manager
    manager.close()


def attach(jm: JobManager, tmp_path: Path, name: str, **kw: object) -> JobInfo:
    spec = JobSpec(name=name, dataset=str(SAMPLE_DATASET),
                   **kw)  # type: ignore[arg-type]
    reply = settle(jm, jm.attach(AttachJob(spec=spec)))
    assert isinstance(reply, JobInfo), reply
    return reply


def settle(jm: JobManager, reply: Future[Reply], now: float | None = None,
           timeout_s: float = 60) -> Reply:
    """Turn the daemon loop's part (``settle_attaches``) until the reply is resolved."""
    end = time.monotonic() + timeout_s
    while not reply.done():
        assert time.monotonic() < end, "attach never settled"
        jm.settle_attaches(now)
        time.sleep(0.005)
    return reply.result()


def counter(jm: JobManager) -> float:
    return jm.metrics.dataset_retokenized._value.get()


def test_attach_tokenizes_into_the_cache_and_a_cache_hit_counts_nothing(
        jm: JobManager, tmp_path: Path) -> None:
    job = attach(jm, tmp_path, "a")
    report = job.dataset_report
    assert report is not None and report["source"] == "file" and report["records"] == 400
    assert jm.dataset_cache.path(str(report["cache_key"])).exists()
    jm.on_job_started(JobStarted(job_id=job.job_id, resumed_from_step=None, total_steps=10,
                                 dataset_report={**report, "source": "cache"}))
    assert counter(jm) == 0


def test_a_finetune_that_tokenized_again_is_logged_and_counted(
        jm: JobManager, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = attach(jm, tmp_path, "a")
    assert job.dataset_report is not None
    with caplog.at_level(logging.WARNING, logger="harli.daemon.job_manager"):
        jm.on_job_started(JobStarted(job_id=job.job_id, resumed_from_step=None, total_steps=10,
                                     dataset_report=job.dataset_report))
    assert counter(jm) == 1 and "tokenized its dataset again" in caplog.text


def test_an_entry_goes_when_no_job_that_may_run_needs_it(jm: JobManager, tmp_path: Path) -> None:
    a = attach(jm, tmp_path, "a")
    b = attach(jm, tmp_path, "b")  # the same file and settings: the same entry
    c = attach(jm, tmp_path, "c", max_seq_len=64)
    key_ab, key_c = (str(j.dataset_report["cache_key"]) for j in (a, c))  # type: ignore[index]
    assert b.dataset_report is not None and b.dataset_report["cache_key"] == key_ab != key_c
    jm.on_job_ended(JobEnded(job_id=a.job_id, status="succeeded", adapter_path="/x",
                             error=None))
    assert jm.dataset_cache.path(key_ab).exists()  # b still needs it
    jm.on_job_ended(JobEnded(job_id=b.job_id, status="cancelled", adapter_path=None,
                             error=None))
    assert not jm.dataset_cache.path(key_ab).exists()
    assert jm.dataset_cache.path(key_c).exists()


def test_a_bad_dataset_is_refused_and_leaves_no_entry(jm: JobManager, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    spec = JobSpec(name="bad", dataset=str(bad))
    reply = settle(jm, jm.attach(AttachJob(spec=spec)))
    assert isinstance(reply, Error) and "bad.jsonl:2" in reply.message
    assert not list(jm.dataset_cache.root.glob("*.msgpack"))


def test_a_dataset_with_no_trainable_token_is_refused(jm: JobManager, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n' * 3)
    spec = JobSpec(name="empty", dataset=str(empty))
    reply = settle(jm, jm.attach(AttachJob(spec=spec)))
    assert isinstance(reply, Error) and "no response tokens left to learn from" in reply.message
    assert jm.store.all_jobs() == []


def test_a_fifo_or_device_is_refused_at_once_and_blocks_no_later_attach(
        jm: JobManager, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for i, dataset in enumerate((str(fifo), "/dev/zero")):
        spec = JobSpec(name=f"bad{i}", dataset=dataset)
        reply = settle(jm, jm.attach(AttachJob(spec=spec)))
        assert isinstance(reply, Error) and "not a regular file" in reply.message
    assert attach(jm, tmp_path, "after").status == "queued"
    assert [j.name for j in jm.store.all_jobs()] == ["after"]


def test_closing_the_manager_stops_an_attach_in_progress(jm: JobManager, tmp_path: Path) -> None:
    jm.validator.cancel.set()  # what close() does first, before it waits for the worker
    spec = JobSpec(name="late", dataset=str(SAMPLE_DATASET))
    reply = settle(jm, jm.attach(AttachJob(spec=spec)))
    assert isinstance(reply, Error) and "the daemon is stopping" in reply.message
    assert jm.store.all_jobs() == []


def test_a_slow_attach_blocks_no_other(jm: JobManager, tmp_path: Path) -> None:
    # A dataset that takes long to read stands in as a validation held until released.
    release = threading.Event()
    validate = jm.validator.validate

    def held(spec: JobSpec, taken: dict[str, str]) -> dict[str, Any]:
        if spec.name == "slow":
            assert release.wait(60)
        return validate(spec, taken)

    jm.validator.validate = held  # type: ignore[method-assign]
    slow = jm.attach(AttachJob(spec=JobSpec(name="slow", dataset=str(SAMPLE_DATASET))))
    quick = settle(jm, jm.attach(AttachJob(spec=JobSpec(name="quick",
                                                        dataset=str(SAMPLE_DATASET)))))
    assert isinstance(quick, JobInfo) and not slow.done()
    # While "slow" is checked its name and directory are taken.
    twin = settle(jm, jm.attach(AttachJob(spec=JobSpec(name="slow", dataset="/x.jsonl"))))
    assert isinstance(twin, Error) and "exists already" in twin.message
    release.set()
    assert isinstance(settle(jm, slow), JobInfo)
    assert sorted(j.name for j in jm.store.all_jobs()) == ["quick", "slow"]


def test_an_attach_checked_after_its_client_gave_up_is_not_stored(jm: JobManager) -> None:
    spec = JobSpec(name="late", dataset=str(SAMPLE_DATASET))
    reply = jm.attach(AttachJob(spec=spec, wait_s=10.0), now=100.0)
    late = settle(jm, reply, now=100.0 + ATTACH_REPLY_SHARE * 10.0 + 0.01)
    assert isinstance(late, Error) and late.code == "timeout"
    assert "not stored" in late.message and "10 s" in late.message
    assert jm.store.all_jobs() == []
    assert jm.metrics.attach_timeouts._value.get() == 1
    # In time, the same job is stored.
    ok = settle(jm, jm.attach(AttachJob(spec=spec, wait_s=10.0), now=200.0), now=205.0)
    assert isinstance(ok, JobInfo)


def test_a_job_without_output_dir_gets_one_under_the_output_root(jm: JobManager) -> None:
    job = settle(jm, jm.attach(AttachJob(spec=JobSpec(name="d", dataset=str(SAMPLE_DATASET)))))
    assert isinstance(job, JobInfo)
    assert job.spec.output_dir == str(jm.cfg.output_roots[0] / "d")


def test_a_job_of_a_rank_decode_cannot_serve_is_refused_naming_both(jm: JobManager) -> None:
    from harli.ipc.jobs import LoraSettings

    spec = JobSpec(name="wide", dataset=str(SAMPLE_DATASET), lora=LoraSettings(r=32))
    reply = settle(jm, jm.attach(AttachJob(spec=spec)))
    assert isinstance(reply, Error) and reply.code == "invalid"
    assert "lora.r 32 is above the highest rank decode serves (16, lora.max_lora_rank)" in \
        reply.message
    assert jm.store.all_jobs() == []


# -- the validation file: checked and tokenized at attach like the dataset ---------------------


def _validation_files(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (validation_file, what the refusal must say)."""
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"text": "fine"}\n{"text": oops}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"text": ""}\n')
    missing = tmp_path / "nope.jsonl"
    return {"missing": (str(missing), f"validation_file: {missing}: dataset file does not exist"),
            "bad_line": (str(bad_line), f"validation_file: {bad_line}:2"),
            "empty": (str(empty), "no records"),
            "unlabelled": (str(unlabelled), f"validation_file {unlabelled}: no response tokens "
                                            f"left to score"),
            "relative": ("valid.jsonl", "validation_file valid.jsonl must be an absolute path"),
            "directory": (str(tmp_path), str(tmp_path))}


@pytest.mark.parametrize("case", ["missing", "bad_line", "empty", "unlabelled", "relative",
                                  "directory"])
def test_a_bad_validation_file_is_refused_naming_it(jm: JobManager, tmp_path: Path,
                                                    case: str) -> None:
    path, says = _validation_files(tmp_path)[case]
    spec = JobSpec(name="v", dataset=str(SAMPLE_DATASET), validation_file=path)
    reply = settle(jm, jm.attach(AttachJob(spec=spec)))
    assert isinstance(reply, Error) and reply.code == "invalid"
    assert says in reply.message, reply.message
    assert jm.store.all_jobs() == []


def test_a_validation_file_is_reported_and_its_cache_entry_kept_while_the_job_may_run(
        jm: JobManager, tmp_path: Path) -> None:
    valid = tmp_path / "valid.jsonl"
    valid.write_text('{"prompt": "one ->", "completion": " 1"}\n' * 5)
    job = attach(jm, tmp_path, "v", validation_file=str(valid))
    report = job.dataset_report
    assert report is not None and report["validation_path"] == str(valid)
    assert report["validation_records"] == 5 and report["validation_format"] == \
        "prompt_completion"
    key = str(report["validation_cache_key"])
    assert key != report["cache_key"] and jm.dataset_cache.path(key).exists()
    assert f"validation file {valid}: 5 records" in jm.store.events(job.job_id)[0].message
    jm._prune_dataset_cache()
    assert jm.dataset_cache.path(key).exists()
    jm.on_job_ended(JobEnded(job_id=job.job_id, status="succeeded", adapter_path="/x",
                             error=None))
    assert not jm.dataset_cache.path(key).exists()


def test_logs_page_through_events_and_metric_events(jm: JobManager, tmp_path: Path) -> None:
    from harli.ipc.control import JobDetail, JobLogs, ShowJob
    from harli.ipc.finetune import StepLogged

    job = attach(jm, tmp_path, "m")
    jm.running = job.job_id
    for step in range(1, 131):
        jm.on_step_logged(StepLogged(job_id=job.job_id, step=step, epoch=step / 50, loss=1.0,
                                     learning_rate=1e-3, grad_norm=None, tokens=step,
                                     tokens_per_s=10.0, level=2))
    jm.on_step_logged(StepLogged(job_id=job.job_id + 1, step=1, epoch=0.0, loss=1.0,
                                 learning_rate=1e-3, grad_norm=None, tokens=1,
                                 tokens_per_s=10.0, level=2))  # not the running job: dropped
    page = jm.logs(JobLogs(job_id=job.job_id, limit=100))
    assert isinstance(page, JobDetail) and page.truncated
    assert len(page.events) == 1 and [m.step for m in page.metrics] == list(range(1, 101))
    rest = jm.logs(JobLogs(job_id=job.job_id, after_event=page.events[-1].event_id,
                           after_metric=page.metrics[-1].metric_id, limit=100))
    assert isinstance(rest, JobDetail) and not rest.truncated and rest.events == []
    assert [m.step for m in rest.metrics] == list(range(101, 131))
    shown = jm.show(ShowJob(job_id=job.job_id))
    assert isinstance(shown, JobDetail) and [m.step for m in shown.metrics] == \
        list(range(31, 131))  # the newest 100
