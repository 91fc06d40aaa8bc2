"""``ControlClient``: request/reply to the daemon's control endpoint (jobs, uploaded files,
status, policy, models and adapters)."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import zmq

from harli.client.inference import RequestError
from harli.ipc import curve, endpoints
from harli.ipc.codec import DecodeFailure, Decoder, encode
from harli.ipc.control import (
    AddAdapter,
    AddFile,
    AttachJob,
    CancelJob,
    CheckpointInfo,
    CheckpointList,
    ControlReply,
    ControlRequest,
    DaemonStatus,
    DeleteFile,
    FileInfo,
    FileList,
    GetMetrics,
    GetStatus,
    JobCheckpoints,
    JobDetail,
    JobEvent,
    JobInfo,
    JobList,
    JobLogs,
    JobMetric,
    ListFiles,
    ListJobs,
    ListModels,
    MetricsPage,
    ModelInfo,
    ModelList,
    PauseJob,
    RemoveAdapter,
    ResumeJob,
    SetLevel,
    SetPolicy,
    ShowFile,
    ShowJob,
)
from harli.ipc.inference import Error
from harli.ipc.jobs import JobSpec


class ControlClient:
    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 120.0,
                 server_key: str | None = None, client_key: str | None = None) -> None:
        endpoint = endpoint or endpoints.default_control_endpoint()
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._keys = (server_key, client_key)
        self._sock = self._connect()
        self._decoder: Decoder[ControlReply | Error] = Decoder(ControlReply | Error)

    def _connect(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        server_key, client_key = self._keys
        if server_key:
            curve.apply_client(sock, server_key, client_key)
        sock.connect(self.endpoint)
        return sock

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, msg: ControlRequest | bytes) -> Any:
        self._sock.send(msg if isinstance(msg, bytes) else encode(msg))
        if not self._sock.poll(int(self.timeout_s * 1000)):
            # Replies carry no request id: a late one must not be read as the answer to the
            # next request, so this connection (and any late reply to it) is dropped.
            self._sock.close(linger=0)
            self._sock = self._connect()
            raise RequestError("timeout", f"no reply from {self.endpoint} within "
                               f"{self.timeout_s:.0f} s")
        try:
            reply = self._decoder.decode(self._sock.recv())
        except DecodeFailure as e:
            raise RequestError(e.code, e.message) from None
        if isinstance(reply, Error):
            raise RequestError(reply.code, reply.message)
        return reply

    def attach(self, spec: JobSpec, owner: str = "") -> JobInfo:
        """Store a job: returned at once, ``validating_files`` while the daemon checks its
        files in the background (``wait_validated`` waits for the outcome). A spec refused
        before that (a name taken, a bad path, ...) raises ``RequestError`` and is not
        stored."""
        reply = self.request(AttachJob(spec=spec, owner=owner))
        assert isinstance(reply, JobInfo)
        return reply

    def wait_validated(self, job_id: int, poll_s: float = 0.2) -> JobInfo:
        """The job once the check of its files has ended: ``queued`` (or further along), or
        ``failed`` with ``error`` naming the file and line. Waits as long as the check takes
        (each request has the client's timeout)."""
        job = self.show(job_id).job
        while job.status == "validating_files":
            time.sleep(poll_s)
            job = self.show(job_id).job
        return job

    def jobs(self, owner: str | None = None) -> list[JobInfo]:
        """Every job, oldest first (``owner``: only the jobs it made)."""
        reply = self.request(ListJobs(owner=owner))
        assert isinstance(reply, JobList)
        return reply.jobs

    def show(self, job_id: int) -> JobDetail:
        reply = self.request(ShowJob(job_id=job_id))
        assert isinstance(reply, JobDetail)
        return reply

    def logs(self, job_id: int, after_event: int = 0, after_metric: int = 0,
             limit: int = 10_000) -> JobDetail:
        """One page of a job's events and metric events after the ids given (``truncated``:
        there are more)."""
        reply = self.request(JobLogs(job_id=job_id, after_event=after_event,
                                     after_metric=after_metric, limit=limit))
        assert isinstance(reply, JobDetail)
        return reply

    def all_logs(self, job_id: int, after_event: int = 0, after_metric: int = 0,
                 limit: int = 10_000) -> JobDetail:
        """Every event and metric event of a job after the ids given: ``logs`` page by page,
        in one ``JobDetail`` (its ``job`` as of the last page)."""
        events: list[JobEvent] = []
        metrics: list[JobMetric] = []
        while True:
            page = self.logs(job_id, after_event, after_metric, limit)
            events += page.events
            metrics += page.metrics
            if events:
                after_event = events[-1].event_id
            if metrics:
                after_metric = metrics[-1].metric_id
            if not page.truncated:
                return JobDetail(job=page.job, events=events, metrics=metrics)

    def cancel(self, job_id: int) -> JobInfo:
        reply = self.request(CancelJob(job_id=job_id))
        assert isinstance(reply, JobInfo)
        return reply

    def pause(self, job_id: int) -> JobInfo:
        reply = self.request(PauseJob(job_id=job_id))
        assert isinstance(reply, JobInfo)
        return reply

    def resume(self, job_id: int) -> JobInfo:
        reply = self.request(ResumeJob(job_id=job_id))
        assert isinstance(reply, JobInfo)
        return reply

    def checkpoints(self, job_id: int) -> list[CheckpointInfo]:
        reply = self.request(JobCheckpoints(job_id=job_id))
        assert isinstance(reply, CheckpointList)
        return reply.checkpoints

    def add_file(self, file_id: str, filename: str, purpose: str, owner: str = "",
                 records: int = 0, fmt: str = "") -> FileInfo:
        reply = self.request(AddFile(file_id=file_id, filename=filename, purpose=purpose,
                                     owner=owner, records=records, format=fmt))
        assert isinstance(reply, FileInfo)
        return reply

    def files(self, owner: str | None = None) -> list[FileInfo]:
        reply = self.request(ListFiles(owner=owner))
        assert isinstance(reply, FileList)
        return reply.files

    def file(self, file_id: str) -> FileInfo:
        reply = self.request(ShowFile(file_id=file_id))
        assert isinstance(reply, FileInfo)
        return reply

    def delete_file(self, file_id: str) -> FileInfo:
        reply = self.request(DeleteFile(file_id=file_id))
        assert isinstance(reply, FileInfo)
        return reply

    def set_level(self, level: int) -> DaemonStatus:
        reply = self.request(SetLevel(level=level))
        assert isinstance(reply, DaemonStatus)
        return reply

    def set_policy(self, policy: str, tpot_slo_ms: float | None = None) -> DaemonStatus:
        reply = self.request(SetPolicy(policy=policy, tpot_slo_ms=tpot_slo_ms))
        assert isinstance(reply, DaemonStatus)
        return reply

    def status(self) -> DaemonStatus:
        reply = self.request(GetStatus())
        assert isinstance(reply, DaemonStatus)
        return reply

    def metrics_page(self, tenant_series: bool = True) -> MetricsPage:
        """The daemon's Prometheus page (what its metrics port serves on ``/metrics``), with
        the ``Content-Type`` to serve it with; without the tenants' job series unless
        ``tenant_series``."""
        reply = self.request(GetMetrics(tenant_series=tenant_series))
        assert isinstance(reply, MetricsPage)
        return reply

    def models(self) -> list[ModelInfo]:
        reply = self.request(ListModels())
        assert isinstance(reply, ModelList)
        return reply.models

    def add_adapter(self, name: str, path: str) -> ModelInfo:
        reply = self.request(AddAdapter(name=name, path=path))
        assert isinstance(reply, ModelInfo)
        return reply

    def remove_adapter(self, name: str, force: bool = False) -> ModelInfo:
        reply = self.request(RemoveAdapter(name=name, force=force))
        assert isinstance(reply, ModelInfo)
        return reply


def to_jsonable(obj: msgspec.Struct) -> Any:
    return msgspec.to_builtins(obj)
