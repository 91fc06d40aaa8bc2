"""``JobManager``'s pause and resume (a user's hold, ``held``), the checkpoints it lists, and
the uploaded files it answers for: a queued job is held at once, a running one is told to
stop after a checkpoint and is held when it has stopped (queued again when resumed
meanwhile, held again when its process dies first); a file a live job uses is not deleted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harli.config import HarliConfig, load
from harli.daemon.disabled import NullChild
from harli.daemon.job_manager import JobManager
from harli.daemon.metrics import Metrics
from harli.daemon.quota import QuotaController
from harli.daemon.supervisor import ChildExited
from harli.datasets import SAMPLE_DATASET
from harli.ipc.control import (
    AddFile,
    AttachJob,
    CancelJob,
    CheckpointList,
    DeleteFile,
    FileInfo,
    JobCheckpoints,
    JobInfo,
    ListFiles,
    ListJobs,
    PauseJob,
    ResumeJob,
    ShowFile,
)
from harli.ipc.finetune import STOPPED, CheckpointSaved, JobEnded, StartJob, StopJob
from harli.ipc.inference import Error, ErrorCode
from harli.ipc.jobs import JobSpec

from .test_job_manager import settle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harli.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0)


class Wired:
    def __init__(self, tmp_path: Path, tiny: Path) -> None:
        self.cfg: HarliConfig = load(None, [f'daemon.runtime_dir="{tmp_path / "run"}"',
                                            f'daemon.state_dir="{tmp_path / "state"}"',
                                            f'model.path="{tiny}"', "memory.arena=false"])
        (tmp_path / "state").mkdir()
        self.sent: list[Any] = []
        metrics = Metrics()
        quota = QuotaController(self.cfg.finetune, self.send, NullChild("finetune"), None,
                                metrics)
        self.jm = JobManager(self.cfg, self.send, metrics, quota)

    def send(self, msg: Any) -> bool:
        self.sent.append(msg)
        return True

    def attach(self, name: str, owner: str = "", dataset: Path = SAMPLE_DATASET) -> JobInfo:
        reply = settle(self.jm, self.jm.attach(AttachJob(
            spec=JobSpec(name=name, dataset=str(dataset)), owner=owner)))
        assert isinstance(reply, JobInfo), reply
        return reply

    def start(self) -> int:
        """The next queued job handed to the finetune (as the daemon's loop does)."""
        self.jm.on_ready()
        self.jm.tick()
        (started,) = [m for m in self.sent if isinstance(m, StartJob)][-1:]
        assert self.jm.running == started.job_id
        return started.job_id

    def status(self, job_id: int) -> str:
        job = self.jm.store.get(job_id)
        assert job is not None
        return job.status


@pytest.fixture
def w(tmp_path: Path, tiny: Path) -> Iterator[Wired]:
    wired = Wired(tmp_path, tiny)
    yield wired
    wired.jm.close()


def test_a_queued_job_is_held_until_resumed(w: Wired) -> None:
    job = w.attach("a", owner="k1")
    assert job.owner == "k1"
    held = w.jm.pause(PauseJob(job_id=job.job_id))
    assert isinstance(held, JobInfo) and held.status == "held"
    assert w.jm.pause(PauseJob(job_id=job.job_id)) == held  # again: unchanged
    w.jm.on_ready()
    w.jm.tick()
    assert w.jm.running is None and not w.sent  # a held job is not scheduled
    resumed = w.jm.resume(ResumeJob(job_id=job.job_id))
    assert isinstance(resumed, JobInfo) and resumed.status == "queued"
    assert w.start() == job.job_id
    kinds = [e.kind for e in w.jm.store.events(job.job_id) if e.kind != "validating"]
    assert kinds[:4] == ["attached", "validated", "paused", "resumed"]


def test_a_running_job_stops_after_a_checkpoint_and_is_held(w: Wired) -> None:
    job_id = w.attach("a").job_id
    w.start()
    reply = w.jm.pause(PauseJob(job_id=job_id))
    assert isinstance(reply, JobInfo) and reply.status in ("running", "paused")
    assert w.sent[-1] == StopJob(job_id=job_id, reason="paused", keep_progress=True)
    w.jm.pause(PauseJob(job_id=job_id))
    assert len([m for m in w.sent if isinstance(m, StopJob)]) == 1  # asked once
    w.jm.on_checkpoint(CheckpointSaved(job_id=job_id, step=3, path="/o/checkpoint-3"))
    w.jm.on_job_ended(JobEnded(job_id=job_id, status=STOPPED, error=None, adapter_path=None))
    assert w.status(job_id) == "held" and w.jm.running is None
    assert w.jm.store.events(job_id)[-1].message == ("paused; resumes from checkpoint-3 when "
                                                     "resumed")
    w.jm.tick()
    assert w.jm.running is None
    w.jm.resume(ResumeJob(job_id=job_id))
    assert w.status(job_id) == "queued"
    assert w.start() == job_id


def test_a_resume_before_the_pause_took_effect_queues_it_again(w: Wired) -> None:
    job_id = w.attach("a").job_id
    w.start()
    w.jm.pause(PauseJob(job_id=job_id))
    w.jm.resume(ResumeJob(job_id=job_id))
    w.jm.on_job_ended(JobEnded(job_id=job_id, status=STOPPED, error=None, adapter_path=None))
    assert w.status(job_id) == "queued"


def test_a_finetune_that_dies_while_pausing_leaves_the_job_held(w: Wired) -> None:
    job_id = w.attach("a").job_id
    w.start()
    w.jm.pause(PauseJob(job_id=job_id))
    w.jm.on_exit(ChildExited(name="finetune", incarnation=1, returncode=-9,
                             was_running=True))
    assert w.status(job_id) == "held" and w.jm.running is None


def test_a_cancel_outranks_a_pause_under_way(w: Wired) -> None:
    job_id = w.attach("a").job_id
    w.start()
    w.jm.pause(PauseJob(job_id=job_id))
    w.jm.cancel(CancelJob(job_id=job_id))
    assert w.sent[-1] == StopJob(job_id=job_id, reason="cancelled")
    w.jm.on_job_ended(JobEnded(job_id=job_id, status="cancelled", error=None,
                               adapter_path=None))
    assert w.status(job_id) == "cancelled"
    # A held job is cancelled at once.
    other = w.attach("b").job_id
    w.jm.pause(PauseJob(job_id=other))
    w.jm.cancel(CancelJob(job_id=other))
    assert w.status(other) == "cancelled"


def test_an_ended_job_cannot_be_paused_or_resumed_and_an_unknown_one_is_unknown(
        w: Wired) -> None:
    job_id = w.attach("a").job_id
    w.jm.cancel(CancelJob(job_id=job_id))
    for reply in (w.jm.pause(PauseJob(job_id=job_id)), w.jm.resume(ResumeJob(job_id=job_id))):
        assert isinstance(reply, Error) and reply.code == ErrorCode.CONFLICT
        assert "has cancelled" in reply.message
    for reply in (w.jm.pause(PauseJob(job_id=99)), w.jm.resume(ResumeJob(job_id=99)),
                  w.jm.checkpoints(JobCheckpoints(job_id=99))):
        assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_REQUEST


def test_jobs_are_listed_by_owner(w: Wired) -> None:
    w.attach("a", owner="k1")
    w.attach("b", owner="k2")
    w.attach("c")
    assert [j.name for j in w.jm.list_jobs(ListJobs(owner="k1")).jobs] == ["a"]
    assert [j.name for j in w.jm.list_jobs(ListJobs(owner="")).jobs] == ["c"]
    assert [j.name for j in w.jm.list_jobs(ListJobs()).jobs] == ["a", "b", "c"]


def test_checkpoints_on_disk_are_listed_with_their_served_name(w: Wired,
                                                               tmp_path: Path) -> None:
    job = w.attach("a")
    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        w.jm.on_checkpoint(CheckpointSaved(job_id=job.job_id, step=step,
                                           path=str(tmp_path / f"checkpoint-{step}")))
    w.jm.served_names = lambda: ["m", "a@step-6"]
    reply = w.jm.checkpoints(JobCheckpoints(job_id=job.job_id))
    assert isinstance(reply, CheckpointList)
    assert [(c.step, c.served_as) for c in reply.checkpoints] == [(3, None), (6, "a@step-6")]


def upload(w: Wired, file_id: str, owner: str = "") -> FileInfo:
    path = w.cfg.files_dir / f"{file_id}.jsonl"
    path.write_bytes(SAMPLE_DATASET.read_bytes())
    reply = w.jm.add_file(AddFile(file_id=file_id, filename="digits.jsonl", purpose="fine-tune",
                                  owner=owner, records=400, format="alpaca"))
    assert isinstance(reply, FileInfo), reply
    return reply


def test_files_are_added_listed_by_owner_and_deleted(w: Wired) -> None:
    f = upload(w, "file-a1", owner="k1")
    upload(w, "file-b2", owner="k2")
    assert f.size_bytes == SAMPLE_DATASET.stat().st_size and f.records == 400
    assert f.path == str(w.cfg.files_dir / "file-a1.jsonl")
    assert [x.file_id for x in w.jm.list_files(ListFiles(owner="k1")).files] == ["file-a1"]
    assert w.jm.show_file(ShowFile(file_id="file-a1")) == f
    gone = w.jm.delete_file(DeleteFile(file_id="file-a1"))
    assert gone == f and not Path(f.path).exists()
    for reply in (w.jm.show_file(ShowFile(file_id="file-a1")),
                  w.jm.delete_file(DeleteFile(file_id="file-a1"))):
        assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_FOUND


def test_a_file_a_live_job_uses_is_not_deleted(w: Wired) -> None:
    f = upload(w, "file-a1")
    job = w.attach("a", dataset=Path(f.path))
    reply = w.jm.delete_file(DeleteFile(file_id="file-a1"))
    assert isinstance(reply, Error) and reply.code == ErrorCode.CONFLICT
    assert f"used by job {job.job_id}" in reply.message and Path(f.path).exists()
    w.jm.cancel(CancelJob(job_id=job.job_id))
    assert isinstance(w.jm.delete_file(DeleteFile(file_id="file-a1")), FileInfo)


def test_a_file_not_in_place_is_refused(w: Wired) -> None:
    reply = w.jm.add_file(AddFile(file_id="file-zz", filename="x.jsonl", purpose="fine-tune"))
    assert isinstance(reply, Error) and reply.code == ErrorCode.INVALID
    assert "does not exist" in reply.message
    (w.cfg.files_dir / "file-ln.jsonl").symlink_to(SAMPLE_DATASET)
    reply = w.jm.add_file(AddFile(file_id="file-ln", filename="x.jsonl", purpose="fine-tune"))
    assert isinstance(reply, Error) and "not a regular file" in reply.message
