"""JobManager's side of the dataset: a job stored at once (``validating_files``) and its files
checked in a worker process, then queued or failed naming the file and line; tokenized once
into the cache the finetune reads, a finetune that had to tokenize again counted, entries no
job needs removed."""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path

import pytest

from harli.config import HarliConfig, load
from harli.daemon.disabled import NullChild
from harli.daemon.job_manager import JobManager, Reply
from harli.daemon.metrics import Metrics
from harli.daemon.quota import QuotaController
from harli.datasets import SAMPLE_DATASET
from harli.ipc.control import AttachJob, CancelJob, JobDetail, JobInfo, PauseJob, ShowJob
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


def settle(jm: JobManager, reply: Reply, timeout_s: float = 120) -> Reply:
    """The attach's outcome: its refusal, or the job once the daemon loop's part
    (``poll_validations``) recorded the end of its files' check (queued or failed)."""
    if not isinstance(reply, JobInfo):
        return reply
    assert reply.status == "validating_files"
    end = time.monotonic() + timeout_s
    while True:
        jm.poll_validations()
        job = jm.show(ShowJob(job_id=reply.job_id))
        assert isinstance(job, JobDetail)
        if job.job.status != "validating_files":
            return job.job
        assert time.monotonic() < end, "validation never ended"
        time.sleep(0.01)


def failed(jm: JobManager, spec: JobSpec) -> str:
    """The error of a job whose files failed their check (stored, then failed)."""
    job = settle(jm, jm.attach(AttachJob(spec=spec)))
    assert isinstance(job, JobInfo) and job.status == "failed", job
    assert job.error is not None and job.error in jm.store.events(job.job_id)[-1].message
    return job.error


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


def test_the_finetune_finds_the_entry_the_worker_wrote(jm: JobManager, tmp_path: Path) -> None:
    # The worker loads the tokenizer without torch, the finetune with it: the same key.
    from transformers import AutoTokenizer

    from harli.datasets import load_dataset

    job = attach(jm, tmp_path, "a")
    assert job.dataset_report is not None
    tok = AutoTokenizer.from_pretrained(str(jm.cfg.model_path))
    examples, report = load_dataset(SAMPLE_DATASET, tok, job.spec.max_seq_len, jm.dataset_cache)
    assert report.source == "cache" and report.cache_key == job.dataset_report["cache_key"]
    assert len(examples) == 400


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


def test_a_bad_dataset_fails_the_job_naming_the_line_and_leaves_no_entry(
        jm: JobManager, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    assert "bad.jsonl:2" in failed(jm, JobSpec(name="bad", dataset=str(bad)))
    assert not [f for f in jm.dataset_cache.root.glob("*") if f.is_file()]


def test_a_dataset_with_no_trainable_token_fails_the_job(jm: JobManager, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n' * 3)
    assert "no response tokens left to learn from" in failed(
        jm, JobSpec(name="empty", dataset=str(empty)))


def test_a_fifo_or_device_fails_at_once_and_blocks_no_later_attach(
        jm: JobManager, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for i, dataset in enumerate((str(fifo), "/dev/zero")):
        assert "not a regular file" in failed(jm, JobSpec(name=f"bad{i}", dataset=dataset))
    assert attach(jm, tmp_path, "after").status == "queued"


def _big_file(path: Path, megabytes: int) -> Path:
    lines = SAMPLE_DATASET.read_bytes().splitlines(keepends=True)
    with path.open("wb") as f:
        written = 0
        for line in itertools.cycle(lines):
            if written >= megabytes * 1_000_000:
                break
            written += f.write(line)
    return path


def test_the_attach_replies_at_once_and_a_long_check_blocks_no_other_job(
        jm: JobManager, tmp_path: Path) -> None:
    big = _big_file(tmp_path / "big.jsonl", 40)  # minutes to tokenize on this host
    slow = jm.attach(AttachJob(spec=JobSpec(name="slow", dataset=str(big))))
    assert isinstance(slow, JobInfo) and slow.status == "validating_files"
    assert slow.validation is not None
    quick = settle(jm, jm.attach(AttachJob(spec=JobSpec(name="quick",
                                                        dataset=str(SAMPLE_DATASET)))))
    assert isinstance(quick, JobInfo) and quick.status == "queued"
    # While "slow" is checked its name is taken, and where its check stands is shown.
    twin = jm.attach(AttachJob(spec=JobSpec(name="slow", dataset="/x.jsonl")))
    assert isinstance(twin, Error) and "exists already" in twin.message
    shown = jm.show(ShowJob(job_id=slow.job_id))
    assert isinstance(shown, JobDetail) and shown.job.status == "validating_files"
    assert shown.job.validation is not None and shown.job.validation.stage in (
        "waiting", "checking", "tokenizing")
    # Paused mid-check: refused (a pause holds a queued or running job).
    paused = jm.pause(PauseJob(job_id=slow.job_id))
    assert isinstance(paused, Error) and paused.code == "conflict"
    assert "being checked" in paused.message
    # Cancelled mid-check: its worker is killed, the job ends cancelled.
    cancelled = jm.cancel(CancelJob(job_id=slow.job_id))
    assert isinstance(cancelled, JobInfo) and cancelled.status == "cancelled"
    assert not len(jm.validations)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_checks_yield_while_decode_needs_the_machine(jm: JobManager, tmp_path: Path) -> None:
    from harli.daemon.validation import RELEASE_S

    big = _big_file(tmp_path / "big.jsonl", 40)
    job = jm.attach(AttachJob(spec=JobSpec(name="held", dataset=str(big))))
    assert isinstance(job, JobInfo)
    pid = jm.validations._running[job.job_id].proc.pid
    jm.validations.hold(True, 100.0)  # decode serves, the finetune's level is 0
    deadline = time.monotonic() + 10
    while _state(pid) != "T":
        assert time.monotonic() < deadline, "the worker was not stopped"
        time.sleep(0.01)
    shown = jm.show(ShowJob(job_id=job.job_id))
    assert isinstance(shown, JobDetail) and shown.job.validation is not None
    assert shown.job.validation.stage == "held"
    jm.validations.hold(False, 100.0 + RELEASE_S / 2)  # not yet: the level may flip back
    assert _state(pid) == "T"
    jm.validations.hold(False, 100.0 + RELEASE_S)
    while _state(pid) == "T":
        assert time.monotonic() < deadline, "the worker was not continued"
        time.sleep(0.01)
    cancelled = jm.cancel(CancelJob(job_id=job.job_id))
    assert isinstance(cancelled, JobInfo) and cancelled.status == "cancelled"


def test_a_check_runs_as_batch_work_and_a_silent_worker_is_logged_with_its_state(
        jm: JobManager, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import signal

    from harli.daemon.validation import STALL_S

    big = _big_file(tmp_path / "big.jsonl", 40)
    job = jm.attach(AttachJob(spec=JobSpec(name="quiet", dataset=str(big))))
    assert isinstance(job, JobInfo)
    pid = jm.validations._running[job.job_id].proc.pid
    deadline = time.monotonic() + 30
    # SCHED_BATCH (3) at nice 19: behind decode and the daemon, ahead of an idle finetune.
    while (_stat(pid)[38], _stat(pid)[16]) != ("3", "19"):
        assert time.monotonic() < deadline, "the worker never set its scheduling"
        time.sleep(0.01)
    os.kill(pid, signal.SIGSTOP)  # stuck, as a worker the kernel never runs would be
    time.sleep(0.1)
    jm.poll_validations()  # what it sent before
    jm.validations.clock = lambda: time.monotonic() + STALL_S + 1
    with caplog.at_level(logging.WARNING, logger="harli.daemon.validation"):
        jm.poll_validations()
        jm.poll_validations()  # logged once
    stalls = [r.getMessage() for r in caplog.records if "has sent nothing" in r.getMessage()]
    assert len(stalls) == 1 and f"pid {pid}" in stalls[0] and "state T" in stalls[0]
    cancelled = jm.cancel(CancelJob(job_id=job.job_id))
    assert isinstance(cancelled, JobInfo) and cancelled.status == "cancelled"


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def test_a_check_cut_by_the_daemon_stopping_runs_again_when_it_starts(
        jm: JobManager, tmp_path: Path) -> None:
    big = _big_file(tmp_path / "big.jsonl", 40)
    job = jm.attach(AttachJob(spec=JobSpec(name="cut", dataset=str(big))))
    assert isinstance(job, JobInfo)
    jm.stop_accepting()
    refused = jm.attach(AttachJob(spec=JobSpec(name="late", dataset=str(SAMPLE_DATASET))))
    assert isinstance(refused, Error) and refused.code == "shutting_down"
    started = time.monotonic()
    jm.close()  # what the daemon's stop does: the worker is killed
    assert time.monotonic() - started < 5
    again = JobManager(jm.cfg, jm.send, Metrics(), jm.quota)
    try:
        stored = again.store.get(job.job_id)
        assert stored is not None and stored.status == "validating_files"
        assert job.job_id in again.validations
        assert "checking them again" in again.store.events(job.job_id)[-1].message
    finally:
        again.close()
    jm.store = type(jm.store)(jm.cfg.state_dir / "jobs.sqlite")  # the fixture closes it again


def test_a_job_without_output_dir_gets_one_under_the_output_root(jm: JobManager) -> None:
    job = jm.attach(AttachJob(spec=JobSpec(name="d", dataset=str(SAMPLE_DATASET))))
    assert isinstance(job, JobInfo)
    assert job.spec.output_dir == str(jm.cfg.output_roots[0] / "d")


@pytest.mark.parametrize(("field", "value", "says"), [
    ("output_dir", "/tmp/a\x00b", "output_dir holds a NUL character"),
    ("output_dir", "/tmp/" + "x" * 300, "output_dir has a component of 300 bytes"),
    ("output_dir", "/tmp/\ud800", "output_dir holds '\\ud800', which is not text"),
    ("output_dir", "/" + "a/" * 2100, "over the limit of 4095 bytes"),
    ("dataset", "/tmp/d\x00.jsonl", "dataset holds a NUL character"),
    ("dataset", "/tmp/" + "y" * 256 + ".jsonl", "dataset has a component of 262 bytes"),
    ("validation_file", "/tmp/\x00", "validation_file holds a NUL character"),
    ("base_model", "m\x00", "base_model holds a NUL character"),
])
def test_a_path_that_is_no_path_is_refused_naming_the_field(
        jm: JobManager, field: str, value: str, says: str) -> None:
    fields: dict[str, str] = {"dataset": str(SAMPLE_DATASET), field: value}
    spec = JobSpec(name="p", **fields)  # type: ignore[arg-type]
    reply = jm.attach(AttachJob(spec=spec))
    assert isinstance(reply, Error) and reply.code == "invalid", reply
    assert says in reply.message, reply.message
    assert jm.store.all_jobs() == []


def test_max_seq_len_over_the_model_context_is_refused_naming_both(jm: JobManager) -> None:
    reply = jm.attach(AttachJob(spec=JobSpec(name="long", dataset=str(SAMPLE_DATASET),
                                             max_seq_len=10**7)))
    assert isinstance(reply, Error) and reply.code == "invalid"
    assert "max_seq_len 10000000 is above the model's context of 2048 tokens" in reply.message
    assert isinstance(jm.attach(AttachJob(spec=JobSpec(name="fits", dataset=str(SAMPLE_DATASET),
                                                       max_seq_len=2048))), JobInfo)


def test_a_job_of_a_rank_decode_cannot_serve_is_refused_naming_both(jm: JobManager) -> None:
    from harli.ipc.jobs import LoraSettings

    spec = JobSpec(name="wide", dataset=str(SAMPLE_DATASET), lora=LoraSettings(r=32))
    reply = jm.attach(AttachJob(spec=spec))
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
    if case == "relative":  # refused before it is stored
        reply = jm.attach(AttachJob(spec=spec))
        assert isinstance(reply, Error) and reply.code == "invalid"
        assert says in reply.message, reply.message
        assert jm.store.all_jobs() == []
    else:
        assert says in failed(jm, spec)


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
    assert f"validation file {valid}: 5 records" in jm.store.events(job.job_id)[-1].message
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
    assert len(page.events) == len(jm.store.events(job.job_id))
    assert [m.step for m in page.metrics] == list(range(1, 101))
    rest = jm.logs(JobLogs(job_id=job.job_id, after_event=page.events[-1].event_id,
                           after_metric=page.metrics[-1].metric_id, limit=100))
    assert isinstance(rest, JobDetail) and not rest.truncated and rest.events == []
    assert [m.step for m in rest.metrics] == list(range(101, 131))
    shown = jm.show(ShowJob(job_id=job.job_id))
    assert isinstance(shown, JobDetail) and [m.step for m in shown.metrics] == \
        list(range(31, 131))  # the newest 100
