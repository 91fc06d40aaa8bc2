"""Request/reply to the daemon's control endpoint (jobs, uploaded files, status, policy,
models and adapters): ``ControlClient`` (blocking, the CLI's) and ``AsyncControlClient``
(asyncio, the HTTP front's).

Each request goes with a request id in its envelope (a frame before the payload), which the
daemon echoes on the reply: replies are matched to requests by it, so an asyncio client has
many requests in flight on one connection with no lock (a slow attach delays nothing else),
and a reply that comes after its request timed out is dropped, never read as another's.
``call(request, ReplyType)`` is the typed form: the reply, of that type, or ``RequestError``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any, TypeVar

import msgspec
import zmq
import zmq.asyncio

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

R = TypeVar("R", bound=ControlReply)


def _reply_as(reply: ControlReply | Error, expect: type[R]) -> R:
    if isinstance(reply, Error):
        raise RequestError(reply.code, reply.message)
    if not isinstance(reply, expect):
        raise RequestError("internal", f"the daemon answered {type(reply).__name__} where "
                                       f"{expect.__name__} was expected")
    return reply


def _request_ids() -> Any:
    """Request ids unique on one connection (and, with the pid, readable in a capture)."""
    prefix = f"{os.getpid()}-"
    return (f"{prefix}{n}".encode() for n in itertools.count(1))


class ControlClient:
    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 120.0,
                 server_key: str | None = None, client_key: str | None = None) -> None:
        endpoint = endpoint or endpoints.default_control_endpoint()
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._keys = (server_key, client_key)
        self._sock = self._connect()
        self._decoder: Decoder[ControlReply | Error] = Decoder(ControlReply | Error)
        self._ids = _request_ids()

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

    def request(self, msg: ControlRequest | bytes) -> ControlReply:
        """The daemon's reply to ``msg``; ``RequestError`` for its error reply, or when none
        comes within the timeout."""
        rid = next(self._ids)
        self._sock.send_multipart([rid, msg if isinstance(msg, bytes) else encode(msg)])
        deadline = time.monotonic() + self.timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._sock.poll(left_ms):
                raise RequestError("timeout", f"no reply from {self.endpoint} within "
                                   f"{self.timeout_s:.0f} s")
            *envelope, payload = self._sock.recv_multipart()
            if envelope == [rid]:
                break  # else: the late reply to a request that timed out
        try:
            reply = self._decoder.decode(payload)
        except DecodeFailure as e:
            raise RequestError(e.code, e.message) from None
        if isinstance(reply, Error):
            raise RequestError(reply.code, reply.message)
        return reply

    def call(self, msg: ControlRequest, expect: type[R]) -> R:
        """The reply to ``msg``, which must be an ``expect``."""
        return _reply_as(self.request(msg), expect)

    def attach(self, spec: JobSpec, owner: str = "") -> JobInfo:
        """Store a job: returned at once, ``validating_files`` while the daemon checks its
        files in the background (``wait_validated`` waits for the outcome). A spec refused
        before that (a name taken, a bad path, ...) raises ``RequestError`` and is not
        stored."""
        return self.call(AttachJob(spec=spec, owner=owner), JobInfo)

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
        return self.call(ListJobs(owner=owner), JobList).jobs

    def show(self, job_id: int) -> JobDetail:
        return self.call(ShowJob(job_id=job_id), JobDetail)

    def logs(self, job_id: int, after_event: int = 0, after_metric: int = 0,
             limit: int = 10_000) -> JobDetail:
        """One page of a job's events and metric events after the ids given (``truncated``:
        there are more)."""
        return self.call(JobLogs(job_id=job_id, after_event=after_event,
                                 after_metric=after_metric, limit=limit), JobDetail)

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
        return self.call(CancelJob(job_id=job_id), JobInfo)

    def pause(self, job_id: int) -> JobInfo:
        return self.call(PauseJob(job_id=job_id), JobInfo)

    def resume(self, job_id: int) -> JobInfo:
        return self.call(ResumeJob(job_id=job_id), JobInfo)

    def checkpoints(self, job_id: int) -> list[CheckpointInfo]:
        return self.call(JobCheckpoints(job_id=job_id), CheckpointList).checkpoints

    def add_file(self, file_id: str, filename: str, purpose: str, owner: str = "",
                 records: int = 0, fmt: str = "") -> FileInfo:
        return self.call(AddFile(file_id=file_id, filename=filename, purpose=purpose,
                                 owner=owner, records=records, format=fmt), FileInfo)

    def files(self, owner: str | None = None) -> list[FileInfo]:
        return self.call(ListFiles(owner=owner), FileList).files

    def file(self, file_id: str) -> FileInfo:
        return self.call(ShowFile(file_id=file_id), FileInfo)

    def delete_file(self, file_id: str) -> FileInfo:
        return self.call(DeleteFile(file_id=file_id), FileInfo)

    def set_level(self, level: int) -> DaemonStatus:
        return self.call(SetLevel(level=level), DaemonStatus)

    def set_policy(self, policy: str, tpot_slo_ms: float | None = None) -> DaemonStatus:
        return self.call(SetPolicy(policy=policy, tpot_slo_ms=tpot_slo_ms), DaemonStatus)

    def status(self) -> DaemonStatus:
        return self.call(GetStatus(), DaemonStatus)

    def metrics_page(self, tenant_series: bool = True) -> MetricsPage:
        """The daemon's Prometheus page (what its metrics port serves on ``/metrics``), with
        the ``Content-Type`` to serve it with; without the tenants' job series unless
        ``tenant_series``."""
        return self.call(GetMetrics(tenant_series=tenant_series), MetricsPage)

    def models(self) -> list[ModelInfo]:
        return self.call(ListModels(), ModelList).models

    def add_adapter(self, name: str, path: str) -> ModelInfo:
        return self.call(AddAdapter(name=name, path=path), ModelInfo)

    def remove_adapter(self, name: str, force: bool = False) -> ModelInfo:
        return self.call(RemoveAdapter(name=name, force=force), ModelInfo)


class AsyncControlClient:
    """asyncio client of the control endpoint: ``await client.call(ShowJob(job_id=1),
    JobDetail)``, any number at once on one connection (replies matched by request id)."""

    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 120.0,
                 server_key: str | None = None, client_key: str | None = None) -> None:
        self.endpoint = endpoint or endpoints.default_control_endpoint()
        self.timeout_s = timeout_s
        self._sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if server_key:
            curve.apply_client(self._sock, server_key, client_key)
        self._sock.connect(self.endpoint)
        self._decoder: Decoder[ControlReply | Error] = Decoder(ControlReply | Error)
        self._ids = _request_ids()
        self._waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._sock.close(linger=0)

    async def call(self, msg: ControlRequest, expect: type[R]) -> R:
        """The reply to ``msg``, which must be an ``expect``; ``RequestError`` for the
        daemon's error reply, or when none comes within the timeout."""
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        rid = next(self._ids)
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = answer
        try:
            await self._sock.send_multipart([rid, encode(msg)])
            payload = await asyncio.wait_for(answer, self.timeout_s)
        except TimeoutError:
            raise RequestError("timeout", f"no reply from {self.endpoint} within "
                               f"{self.timeout_s:.0f} s") from None
        finally:
            self._waiting.pop(rid, None)  # a late reply finds no one and is dropped
        try:
            reply = self._decoder.decode(payload)
        except DecodeFailure as e:
            raise RequestError(e.code, e.message) from None
        return _reply_as(reply, expect)

    async def _read_loop(self) -> None:
        try:
            while True:
                *envelope, payload = await self._sock.recv_multipart()
                answer = self._waiting.get(envelope[0]) if len(envelope) == 1 else None
                if answer is not None and not answer.done():
                    answer.set_result(payload)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the socket failed: every caller hears it
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(RequestError("unavailable", f"control link to "
                                                      f"{self.endpoint} failed: {e}"))


def to_jsonable(obj: msgspec.Struct) -> Any:
    return msgspec.to_builtins(obj)
