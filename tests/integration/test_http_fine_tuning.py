"""OpenAI's files and fine-tuning API on the real daemon, driven by the real ``openai`` SDK:
a dataset uploaded, a job trained on it to ``succeeded`` with message and metrics events and
checkpoints, its ``fine_tuned_model`` called at once; a queued job paused, resumed and
cancelled; a running job paused after a checkpoint and resumed from it; the CLI's view of the
same jobs; and bad input answered with OpenAI's error object, another key's files and jobs as
if they did not exist."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from openai.types.fine_tuning import FineTuningJob

from harli.bench.local_daemon import LocalDaemon
from harli.client.control import ControlClient
from harli.datasets import SAMPLE_DATASET

from .conftest import free_port, make_daemon, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

KEY, OTHER_KEY = "sk-ft-one", "sk-ft-two"
# A few records of the shipped dataset: quick to check, tokenize and train on.
LINES = SAMPLE_DATASET.read_bytes().splitlines(keepends=True)[:48]
SMALL = {"max_seq_len": 64, "micro_batch_size": 4, "learning_rate": 5e-3,
         "lr_schedule": "constant"}


class Api:
    def __init__(self, daemon: LocalDaemon, port: int) -> None:
        self.daemon = daemon
        self.base = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key=KEY, max_retries=0)
        self.other = openai.OpenAI(base_url=f"{self.base}/v1", api_key=OTHER_KEY,
                                   max_retries=0)

    def wait(self) -> None:
        wait_http(self.base, self.daemon)

    def upload(self, tmp_path: Path, name: str = "digits.jsonl",
               body: bytes = b"".join(LINES)) -> str:
        path = tmp_path / name
        path.write_bytes(body)
        with path.open("rb") as f:
            return self.client.files.create(file=f, purpose="fine-tune").id

    def job_until(self, job_id: str, pred: Callable[[FineTuningJob], bool],
                  timeout_s: float = 180) -> FineTuningJob:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.client.fine_tuning.jobs.retrieve(job_id)
            if pred(job):
                return job
            assert job.status != "failed", job.error
            assert time.monotonic() < deadline, f"{job_id}: {job}\n{self.daemon.log_tail()}"
            time.sleep(0.25)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Api]:
    base = tmp_path_factory.mktemp("http-ft")
    keys = base / "keys"
    keys.write_text(f"{KEY}\n{OTHER_KEY}\n")
    port = free_port()
    with make_daemon(base / "d", tiny_model, f"http.port={port}",
                     f'http.api_keys_file="{keys}"') as d:
        a = Api(d, port)
        a.wait()
        yield a


def base_model(api: Api) -> str:
    return next(m.id for m in api.client.models.list().data if m.parent is None)


def test_files_are_uploaded_listed_read_and_deleted_by_their_key_only(api: Api,
                                                                        tmp_path: Path) -> None:
    file_id = api.upload(tmp_path)
    f = api.client.files.retrieve(file_id)
    assert (f.filename, f.purpose, f.bytes, f.status) == (
        "digits.jsonl", "fine-tune", len(b"".join(LINES)), "processed")
    assert file_id in [x.id for x in api.client.files.list()]
    assert api.client.files.content(file_id).content == b"".join(LINES)
    assert file_id not in [x.id for x in api.other.files.list()]
    for call in (lambda: api.other.files.retrieve(file_id),
                 lambda: api.other.files.content(file_id),
                 lambda: api.other.files.delete(file_id)):
        with pytest.raises(openai.NotFoundError, match="No such File object"):
            call()
    assert api.client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        api.client.files.retrieve(file_id)


def test_a_job_trains_to_succeeded_and_its_model_is_served_at_once(api: Api,
                                                                   tmp_path: Path) -> None:
    file_id = api.upload(tmp_path)
    base = base_model(api)
    job = api.client.fine_tuning.jobs.create(
        training_file=file_id, model=base, suffix="digits", hyperparameters={"n_epochs": 1},
        extra_body={"harli": {"max_steps": 6, "checkpoint_every": 3, **SMALL}})
    # Created at once, its file checked in the background (OpenAI's validating_files).
    assert job.status == "validating_files" and job.training_file == file_id
    assert job.model == base and job.fine_tuned_model is None
    done = api.job_until(job.id, lambda j: j.status == "succeeded")
    assert done.fine_tuned_model is not None and done.fine_tuned_model.startswith("ft-digits-")
    assert done.finished_at is not None and done.trained_tokens
    # Callable the moment the job says succeeded.
    reply = api.client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "one two"}],
        max_tokens=4, temperature=0.0)
    assert reply.model == done.fine_tuned_model and reply.choices[0].message.content is not None

    events = list(api.client.fine_tuning.jobs.list_events(job.id, limit=100))
    kinds = {e.type for e in events}
    assert kinds == {"message", "metrics"}
    steps = [e.data["step"] for e in events if e.type == "metrics"]  # type: ignore[index]
    assert steps == sorted(steps, reverse=True) and max(steps) == 6  # newest first
    assert any("finished" in e.message for e in events if e.type == "message")
    page = api.client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(page.data) == 2 and page.has_more

    checkpoints = api.client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [6, 3]
    assert all(c.fine_tuning_job_id == job.id and c.metrics.train_loss is not None
               for c in checkpoints)
    # The CLI sees the same job in the same store, with its owner.
    with ControlClient(api.daemon.cfg.control_endpoint) as c:
        (mine,) = [j for j in c.jobs() if j.name == done.fine_tuned_model]
    assert mine.status == "succeeded" and mine.owner and mine.spec.max_steps == 6
    # No job that has not ended uses the file now: it can be deleted.
    assert api.client.files.delete(file_id).deleted


def test_jobs_are_paused_resumed_and_cancelled_queued_or_running(api: Api,
                                                                 tmp_path: Path) -> None:
    file_id = api.upload(tmp_path)
    base = base_model(api)
    long = api.client.fine_tuning.jobs.create(
        training_file=file_id, model=base,
        extra_body={"harli": {"max_steps": 100_000, "checkpoint_every": 100_000, **SMALL}})
    running = api.job_until(long.id, lambda j: j.status == "running"
                            and (j.model_extra or {})["harli"]["step"] >= 2)
    # A second job waits behind it: paused, resumed and cancelled while queued.
    queued = api.client.fine_tuning.jobs.create(training_file=file_id, model=base,
                                                extra_body={"harli": SMALL})
    assert queued.status == "validating_files"
    api.job_until(queued.id, lambda j: j.status == "queued")
    assert api.client.fine_tuning.jobs.pause(queued.id).status == "paused"
    assert api.client.fine_tuning.jobs.resume(queued.id).status == "queued"
    assert api.client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    # Its file is in use by the running job.
    with pytest.raises(openai.ConflictError, match=long.id):
        api.client.files.delete(file_id)
    newest = api.client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in newest.data] == [queued.id, long.id] and newest.has_more
    # The running job stops after a checkpoint of the step it reached ...
    api.client.fine_tuning.jobs.pause(long.id)
    paused = api.job_until(long.id, lambda j: j.status == "paused")
    step = (paused.model_extra or {})["harli"]["checkpoint_step"]
    assert step is not None and step >= (running.model_extra or {})["harli"]["step"]
    (ckpt,) = api.client.fine_tuning.jobs.checkpoints.list(long.id).data
    assert ckpt.step_number == step
    time.sleep(1.0)
    assert api.client.fine_tuning.jobs.retrieve(long.id).status == "paused"  # held
    # ... and continues from it when resumed.
    api.client.fine_tuning.jobs.resume(long.id)
    api.job_until(long.id, lambda j: j.status == "running"
                  and (j.model_extra or {})["harli"]["step"] > step)
    messages = [e.message for e in api.client.fine_tuning.jobs.list_events(long.id, limit=100)]
    assert f"resumed from checkpoint-{step}" in messages
    api.client.fine_tuning.jobs.cancel(long.id)
    assert api.job_until(long.id, lambda j: j.status == "cancelled").finished_at is not None
    with pytest.raises(openai.ConflictError):
        api.client.fine_tuning.jobs.resume(long.id)


def test_bad_input_gets_openai_errors_and_other_keys_see_nothing(api: Api,
                                                                 tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_bytes(LINES[0] + b"this is not JSON\n")
    with bad.open("rb") as f, pytest.raises(openai.BadRequestError) as e:
        api.client.files.create(file=f, purpose="fine-tune")
    assert "notes.txt:2: not valid JSON" in str(e.value)
    assert e.value.body["param"] == "file"  # type: ignore[index]
    with (tmp_path / "ok.jsonl").open("wb") as f:
        f.write(b"".join(LINES))
    with (tmp_path / "ok.jsonl").open("rb") as f, pytest.raises(openai.BadRequestError) as e:
        api.client.files.create(file=f, purpose="assistants")
    assert e.value.body["param"] == "purpose"  # type: ignore[index]
    file_id = api.upload(tmp_path)
    base = base_model(api)
    with pytest.raises(openai.NotFoundError) as nf:
        api.other.fine_tuning.jobs.create(training_file=file_id, model=base)
    assert nf.value.body["param"] == "training_file"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        api.client.fine_tuning.jobs.create(training_file=file_id, model="no-such-model")
    with pytest.raises(openai.BadRequestError, match=r"harli\.max_steps"):
        api.client.fine_tuning.jobs.create(training_file=file_id, model=base,
                                           extra_body={"harli": {"max_steps": 0}})
    for job_id in ("ftjob-999999", "nonsense"):
        with pytest.raises(openai.NotFoundError):
            api.client.fine_tuning.jobs.retrieve(job_id)
    job = api.client.fine_tuning.jobs.create(training_file=file_id, model=base,
                                             extra_body={"harli": {"max_steps": 1, **SMALL}})
    for call in (lambda: api.other.fine_tuning.jobs.retrieve(job.id),
                 lambda: api.other.fine_tuning.jobs.cancel(job.id),
                 lambda: api.other.fine_tuning.jobs.list_events(job.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert job.id not in [j.id for j in api.other.fine_tuning.jobs.list()]
    api.job_until(job.id, lambda j: j.status == "succeeded")
