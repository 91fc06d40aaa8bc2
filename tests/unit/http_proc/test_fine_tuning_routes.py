"""The files and fine-tuning routes over a fake daemon link (no daemon, no sockets): uploads
checked, kept and registered, bad ones refused with nothing left behind; files and jobs seen
only by the key that made them (404 for another); jobs created, listed, steered; a file in
use not deleted."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from harli.config import load
from harli.http_proc.app import Limits, add_harli_routes
from harli.http_proc.auth import ApiKeys
from harli.http_proc.errors import ApiError
from harli.http_proc.json_text import lone_surrogate
from harli.ipc.control import (
    AddFile,
    AttachJob,
    CancelJob,
    DeleteFile,
    FileInfo,
    FileList,
    JobDetail,
    JobInfo,
    JobList,
    JobLogs,
    ListFiles,
    ListJobs,
    ModelInfo,
    PauseJob,
    ResumeJob,
    ShowFile,
)

KEY_A, KEY_B = "sk-a", "sk-b"
GOOD = b'{"prompt": "one", "completion": "1"}\n{"prompt": "two", "completion": "2"}\n'


class FakeLink:
    """The daemon's side of ``DaemonLink.call``, in memory: each request type to its
    handler, as the daemon's control table routes them."""

    base_model = "tiny"

    def __init__(self, files_dir: Path) -> None:
        self.files_dir = files_dir
        self.files: dict[str, FileInfo] = {}
        self.jobs: dict[int, JobInfo] = {}
        self.handlers: dict[type[Any], Any] = {
            AddFile: self._add_file, ShowFile: lambda m: self._file(m.file_id),
            ListFiles: self._files, DeleteFile: self._delete_file, AttachJob: self._attach,
            JobLogs: self._logs, ListJobs: self._jobs,
            PauseJob: lambda m: self._set(m.job_id, "held"),
            ResumeJob: lambda m: self._set(m.job_id, "queued"),
            CancelJob: lambda m: self._set(m.job_id, "cancelled")}

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo(name="tiny", kind="base", path="/m", source="model"),
                ModelInfo(name="old-job", kind="adapter", path="/o", source="job")]

    async def call(self, msg: Any, expect: type[Any]) -> Any:
        reply = self.handlers[type(msg)](msg)
        assert isinstance(reply, expect), (msg, reply)
        return reply

    def _add_file(self, m: AddFile) -> FileInfo:
        path = self.files_dir / f"{m.file_id}.jsonl"
        assert path.is_file()
        self.files[m.file_id] = FileInfo(
            file_id=m.file_id, filename=m.filename, purpose=m.purpose, owner=m.owner,
            size_bytes=path.stat().st_size, created_s=time.time(), path=str(path),
            records=m.records, format=m.format)
        return self.files[m.file_id]

    def _file(self, file_id: str) -> FileInfo:
        if file_id not in self.files:
            raise ApiError.from_daemon("not_found", f"no file with id {file_id}")
        return self.files[file_id]

    def _files(self, m: ListFiles) -> FileList:
        return FileList(files=[f for f in self.files.values()
                               if m.owner is None or f.owner == m.owner])

    def _delete_file(self, m: DeleteFile) -> FileInfo:
        f = self._file(m.file_id)
        if any(j.spec.dataset == f.path and j.status == "queued" for j in self.jobs.values()):
            raise ApiError.from_daemon("conflict", "in use")
        Path(f.path).unlink()
        return self.files.pop(m.file_id)

    def _attach(self, m: AttachJob) -> JobInfo:
        job_id = len(self.jobs) + 1
        self.jobs[job_id] = JobInfo(
            job_id=job_id, name=m.spec.name, status="queued", priority=0,
            created_s=time.time(), started_s=None, finished_s=None, step=0, total_steps=None,
            epoch=0, micro_steps=0, tokens=0, loss=None, first_loss=None, level=None,
            paused_s=0.0, tokens_per_s=None, checkpoint_step=None, restarts=0, error=None,
            adapter_path=None, dataset_report=None, spec=m.spec, owner=m.owner)
        return self.jobs[job_id]

    def _logs(self, m: JobLogs) -> JobDetail:
        if m.job_id not in self.jobs:
            raise ApiError.from_daemon("unknown_request", f"no job with id {m.job_id}")
        return JobDetail(job=self.jobs[m.job_id], events=[])

    def _jobs(self, m: ListJobs) -> JobList:
        return JobList(jobs=[j for j in self.jobs.values()
                             if m.owner is None or j.owner == m.owner])

    def _set(self, job_id: int, status: str) -> JobInfo:
        self.jobs[job_id] = msgspec.structs.replace(self.jobs[job_id], status=status)
        return self.jobs[job_id]


class Api:
    def __init__(self, tmp_path: Path) -> None:
        cfg = load(None, [f'daemon.runtime_dir="{tmp_path / "run"}"',
                          f'daemon.state_dir="{tmp_path / "state"}"'])
        self.files_dir = cfg.files_dir
        keys = ApiKeys([KEY_A, KEY_B])
        self.link = FakeLink(cfg.files_dir)
        app = FastAPI()
        add_harli_routes(app, cfg, self.link)
        self.client = TestClient(Limits(app, keys, 4 << 20))

    def call(self, method: str, path: str, key: str = KEY_A, **kw: Any) -> Any:
        return self.client.request(method, path, headers={"Authorization": f"Bearer {key}"},
                                   **kw)

    def upload(self, body: bytes = GOOD, name: str = "train.jsonl", purpose: str = "fine-tune",
               key: str = KEY_A) -> Any:
        return self.call("POST", "/v1/files", key, files={"file": (name, body)},
                         data={"purpose": purpose})

    def left(self) -> list[str]:
        return sorted(p.name for p in self.files_dir.iterdir()) if self.files_dir.exists() \
            else []


@pytest.fixture
def api(tmp_path: Path) -> Api:
    return Api(tmp_path)


def error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_an_upload_is_checked_kept_and_shown_only_to_its_key(api: Api) -> None:
    r = api.upload()
    assert r.status_code == 200, r.text
    f = r.json()
    assert (f["object"], f["filename"], f["purpose"], f["bytes"], f["status"]) == (
        "file", "train.jsonl", "fine-tune", len(GOOD), "processed")
    assert api.left() == [f"{f['id']}.jsonl"]  # no temporary file left
    assert (api.files_dir / f"{f['id']}.jsonl").stat().st_mode & 0o777 == 0o600
    assert [x["id"] for x in api.call("GET", "/v1/files").json()["data"]] == [f["id"]]
    assert api.call("GET", "/v1/files", KEY_B).json()["data"] == []
    assert api.call("GET", f"/v1/files/{f['id']}").json() == f
    assert api.call("GET", f"/v1/files/{f['id']}/content").content == GOOD
    for path in (f"/v1/files/{f['id']}", f"/v1/files/{f['id']}/content"):
        assert "No such File object" in error(api.call("GET", path, KEY_B), 404)["message"]
    error(api.call("DELETE", f"/v1/files/{f['id']}", KEY_B), 404)
    assert api.call("DELETE", f"/v1/files/{f['id']}").json() == {
        "id": f["id"], "object": "file", "deleted": True}
    assert api.left() == []
    error(api.call("GET", "/v1/files/file-nope"), 404)
    assert api.call("GET", "/v1/files/../../etc").status_code == 404  # no such route


@pytest.mark.parametrize(("body", "purpose", "param", "words"), [
    (b'{"text": "a"}\nnot json\n', "fine-tune", "file", "bad.jsonl:2: not valid JSON"),
    (b'{"text": "a"}\n{"prompt": "b", "completion": "c"}\n', "fine-tune", "file",
     "bad.jsonl:2: record is in format 'prompt_completion'"),
    (b"", "fine-tune", "file", "has no records"),
    (GOOD, "assistants", "purpose", "'fine-tune' only"),
])
def test_a_bad_upload_is_a_400_naming_it_and_leaves_nothing(
        api: Api, body: bytes, purpose: str, param: str, words: str) -> None:
    err = error(api.upload(body, "bad.jsonl", purpose), 400)
    assert err["param"] == param and words in err["message"], err
    assert api.left() == [] and api.link.files == {}


def test_a_large_bad_upload_leaves_no_file_and_no_open_file_handle(api: Api) -> None:
    import os

    body = b'{"text": "a"}\n' * 120_000 + b"oops\n"  # past the parser's in-memory spool
    api.upload(GOOD)  # the first request opens what the client and app keep open
    before = len(os.listdir("/proc/self/fd"))
    err = error(api.upload(body, "big.jsonl"), 400)
    assert "big.jsonl:120001: not valid JSON" in err["message"]
    assert len(os.listdir("/proc/self/fd")) == before
    assert len(api.left()) == 1 and len(api.link.files) == 1
    assert error(api.upload(b"x" * (5 << 20)), 413)["code"] == "request_too_large"


def test_an_upload_without_a_file_or_as_json_is_a_400(api: Api) -> None:
    assert error(api.call("POST", "/v1/files", files={"purpose": (None, "fine-tune")}),
                 400)["param"] == "file"
    assert "multipart/form-data" in error(api.call("POST", "/v1/files", json={
        "purpose": "fine-tune"}), 400)["message"]
    assert error(api.call("POST", "/v1/files", files={"file": ("t.jsonl", GOOD)},
                          data={"purpose": "fine-tune", "expires_after": "1"}),
                 400)["param"] == "expires_after"


def test_jobs_are_created_on_the_keys_own_files_and_steered(api: Api) -> None:
    file_id = api.upload().json()["id"]
    err = error(api.call("POST", "/v1/fine_tuning/jobs", KEY_B, json={
        "model": "tiny", "training_file": file_id}), 404)
    assert err["param"] == "training_file" and file_id in err["message"]
    assert error(api.call("POST", "/v1/fine_tuning/jobs", json={
        "model": "nope", "training_file": file_id}), 404)["param"] == "model"
    assert error(api.call("POST", "/v1/fine_tuning/jobs", json={
        "model": "old-job", "training_file": file_id}), 400)["param"] == "model"
    assert error(api.call("POST", "/v1/fine_tuning/jobs", json={
        "model": "tiny", "training_file": file_id, "harli": {"max_steps": -1}}),
        400)["param"] == "harli.max_steps"
    r = api.call("POST", "/v1/fine_tuning/jobs", json={
        "model": "tiny", "training_file": file_id, "suffix": "digits",
        "hyperparameters": {"n_epochs": 2}, "harli": {"max_steps": 6}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert (job["id"], job["status"], job["training_file"], job["model"]) == (
        "ftjob-1", "queued", file_id, "tiny")
    assert job["harli"]["name"].startswith("ft-digits-")
    spec = api.link.jobs[1].spec
    assert (spec.dataset, spec.epochs, spec.max_steps) == (
        str(api.files_dir / f"{file_id}.jsonl"), 2, 6)
    assert api.link.jobs[1].owner != "" and api.call(
        "GET", "/v1/fine_tuning/jobs", KEY_B).json()["data"] == []
    for path in ("/v1/fine_tuning/jobs/ftjob-1", "/v1/fine_tuning/jobs/ftjob-9",
                 "/v1/fine_tuning/jobs/nope"):
        error(api.call("GET", path, KEY_B), 404)
    error(api.call("POST", "/v1/fine_tuning/jobs/ftjob-1/cancel", KEY_B), 404)
    err = error(api.call("DELETE", f"/v1/files/{file_id}"), 409)
    assert "ftjob-1" in err["message"]
    assert api.call("POST", "/v1/fine_tuning/jobs/ftjob-1/pause").json()["status"] == "paused"
    assert api.call("POST", "/v1/fine_tuning/jobs/ftjob-1/resume").json()["status"] == "queued"
    assert api.call("POST", "/v1/fine_tuning/jobs/ftjob-1/cancel").json()["status"] == \
        "cancelled"
    assert api.call("DELETE", f"/v1/files/{file_id}").status_code == 200


def test_jobs_are_listed_newest_first_in_pages(api: Api) -> None:
    file_id = api.upload().json()["id"]
    for _ in range(3):
        api.call("POST", "/v1/fine_tuning/jobs",
                 json={"model": "tiny", "training_file": file_id})
    first = api.call("GET", "/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ["ftjob-3", "ftjob-2"] and first["has_more"]
    rest = api.call("GET", "/v1/fine_tuning/jobs",
                    params={"limit": 2, "after": "ftjob-2"}).json()
    assert [j["id"] for j in rest["data"]] == ["ftjob-1"] and not rest["has_more"]
    assert error(api.call("GET", "/v1/fine_tuning/jobs", params={"limit": 101}),
                 400)["param"] == "limit"
    assert error(api.call("GET", "/v1/fine_tuning/jobs", params={"after": "x"}),
                 400)["param"] == "after"


def _raw(api: Api, path: str, body: str) -> Any:
    """POST ``body``, JSON text as a client wrote it (``json=`` would escape it again)."""
    return api.client.post(path, content=body.encode(),
                           headers={"Authorization": f"Bearer {KEY_A}",
                                    "Content-Type": "application/json"})


@pytest.mark.parametrize(("path", "body", "where"), [
    ("/v1/fine_tuning/jobs", '{"model": "tiny", "training_file": "file-1", '
     '"harli": {"output_dir": "/tmp/\\ud800"}}', "`harli.output_dir`"),
    ("/v1/fine_tuning/jobs", '{"model": "tiny", "training_file": "file-1", '
     '"harli": {"\\udfff": 1}}', "a key of `harli`"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "hi"}', "`model`"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", '
     '"content": "a\\ud800b"}]}', "`messages.0.content`"),
    ("/v1/load_lora_adapter", '{"lora_name": "a", "lora_path": "/\\ud800"}', "`lora_path`"),
])
def test_a_lone_surrogate_in_a_json_body_is_a_400_naming_where(
        api: Api, path: str, body: str, where: str) -> None:
    # Python's json reads "\ud800"; such a string once reached the tokenizer, the daemon's
    # encoder or the error reply that echoed it, each a 500.
    err = error(_raw(api, path, body), 400)
    assert err["message"].startswith("the body is not valid JSON: ")
    assert where in err["message"] and "lone UTF-16 surrogate" in err["message"]
    assert api.link.jobs == {}
    # A surrogate pair is one character, as any JSON reader takes it.
    assert lone_surrogate(json.loads('{"a": ["\\ud83d\\ude00"]}')) is None


@pytest.mark.parametrize("public_id", ["ftjob-²", "ftjob-١", "ftjob-01", "ftjob-1%0A"])
def test_a_job_id_not_as_written_is_no_job(api: Api, public_id: str) -> None:
    # "ftjob-²" once raised in int() (a 500); "ftjob-١" named job 1.
    file_id = api.upload().json()["id"]
    assert api.call("POST", "/v1/fine_tuning/jobs",
                    json={"model": "tiny", "training_file": file_id}).status_code == 200
    for suffix in ("", "/cancel", "/events"):
        method = "POST" if suffix == "/cancel" else "GET"
        error(api.call(method, f"/v1/fine_tuning/jobs/{public_id}{suffix}"), 404)
    assert api.link.jobs[1].status == "queued"
