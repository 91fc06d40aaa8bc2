"""The ``ControlEndpoint`` on a fake ROUTER, with the control API's table (``control_handlers``)
over a fake job manager: each request type reaches its handler, quota requests become policies,
deferred replies go out once done, and bad requests get typed errors. No ZMQ, no process."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, get_args

import msgspec
import pytest

from harli.daemon.control_endpoint import ControlEndpoint, control_handlers
from harli.ipc.codec import encode
from harli.ipc.control import (
    AddAdapter,
    AddFile,
    AttachJob,
    CancelJob,
    ControlReply,
    ControlRequest,
    DaemonStatus,
    DeleteFile,
    FileList,
    GetMetrics,
    GetStatus,
    JobCheckpoints,
    JobList,
    JobLogs,
    ListFiles,
    ListJobs,
    ListModels,
    MetricsPage,
    ModelList,
    PauseJob,
    RemoveAdapter,
    ResumeJob,
    SetLevel,
    SetPolicy,
    ShowFile,
    ShowJob,
)
from harli.ipc.inference import Error, ErrorCode
from harli.ipc.jobs import JobSpec

from .fake_sockets import FakeRouter

LIMIT = 4096
PAGE = MetricsPage(text="# HELP x An example.\n# TYPE x gauge\nx 1.0\n",
                   content_type="text/plain; version=0.0.4; charset=utf-8")
STATUS = DaemonStatus(state="serving", pid=1, children=[], model="m", decode_iterations=0,
                      memory=None, job_running=None, jobs_queued=0, level=2)


class FakeJobs:
    """The job manager's side of the table: records each call, answers what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.attached: Future[Any] = Future()

    def _answer(self, name: str, msg: Any) -> Any:
        self.calls.append((name, msg))
        if name in ("list_jobs", "list_files"):
            return JobList(jobs=[]) if name == "list_jobs" else FileList(files=[])
        return Error(request_id=None, code=ErrorCode.UNKNOWN_REQUEST,
                     message=f"{name} {getattr(msg, 'job_id', None) or msg.file_id}")

    def attach(self, msg: AttachJob) -> Future[Any]:
        self.calls.append(("attach", msg))
        return self.attached

    def list_jobs(self, msg: ListJobs) -> Any:
        return self._answer("list_jobs", msg)

    def show(self, msg: ShowJob) -> Any:
        return self._answer("show", msg)

    def logs(self, msg: JobLogs) -> Any:
        return self._answer("logs", msg)

    def cancel(self, msg: CancelJob) -> Any:
        return self._answer("cancel", msg)

    def pause(self, msg: PauseJob) -> Any:
        return self._answer("pause", msg)

    def resume(self, msg: ResumeJob) -> Any:
        return self._answer("resume", msg)

    def checkpoints(self, msg: JobCheckpoints) -> Any:
        return self._answer("checkpoints", msg)

    def add_file(self, msg: AddFile) -> Any:
        return self._answer("add_file", msg)

    def list_files(self, msg: ListFiles) -> Any:
        return self._answer("list_files", msg)

    def show_file(self, msg: ShowFile) -> Any:
        return self._answer("show_file", msg)

    def delete_file(self, msg: DeleteFile) -> Any:
        return self._answer("delete_file", msg)


class Harness:
    def __init__(self) -> None:
        self.sock = FakeRouter(ControlReply | Error, envelope_frames=True)
        self.jobs = FakeJobs()
        self.policies: list[tuple[str, float | None]] = []
        self.refuse: str | None = None  # set_policy raises ValueError with this
        self.pages: list[bool] = []  # tenant_series of each page asked for
        handlers = control_handlers(self.jobs, lambda: STATUS,  # type: ignore[arg-type]
                                    self._set_policy, self._page, models={
                                        ListModels: lambda m: ModelList(models=[]),
                                        AddAdapter: lambda m: Error(
                                            request_id=None, code="invalid", message=m.name),
                                        RemoveAdapter: lambda m: Error(
                                            request_id=None, code="not_found", message=m.name)})
        self.endpoint = ControlEndpoint(self.sock, LIMIT, handlers)

    def _page(self, tenant_series: bool) -> MetricsPage:
        self.pages.append(tenant_series)
        return PAGE

    def _set_policy(self, spec: str, tpot_slo_ms: float | None) -> None:
        if self.refuse is not None:
            raise ValueError(self.refuse)
        self.policies.append((spec, tpot_slo_ms))

    def ask(self, msg: msgspec.Struct | bytes, client: bytes = b"tool") -> list[Any]:
        before = len(self.sock.replies(client))
        self.sock.feed(client, msg if isinstance(msg, bytes) else encode(msg))
        self.endpoint.drain()
        return self.sock.replies(client)[before:]


def error_of(replies: list[Any]) -> Error:
    (reply,) = replies
    assert isinstance(reply, Error)
    return reply


def test_the_table_covers_every_control_request() -> None:
    assert set(Harness().endpoint.handlers) == set(get_args(ControlRequest))


def test_status_is_answered_with_the_daemon_status() -> None:
    assert Harness().ask(GetStatus()) == [STATUS]


def test_the_metrics_page_is_answered_with_the_page() -> None:
    h = Harness()
    assert h.ask(GetMetrics()) == [PAGE]
    assert h.ask(GetMetrics(tenant_series=False)) == [PAGE]
    assert h.pages == [True, False]  # asked with the tenants' series, then without


def test_a_policy_switch_is_applied_and_answered_with_the_status() -> None:
    h = Harness()
    assert h.ask(SetPolicy(policy="harli:strict", tpot_slo_ms=25.0)) == [STATUS]
    assert h.policies == [("harli:strict", 25.0)]


def test_a_fixed_level_is_the_static_policy() -> None:
    h = Harness()
    assert h.ask(SetLevel(level=3)) == [STATUS]
    assert h.policies == [("static:3", None)]


def test_a_refused_policy_is_an_invalid_request() -> None:
    h = Harness()
    h.refuse = "static level must be in 0..4"
    e = error_of(h.ask(SetLevel(level=9)))
    assert (e.code, e.message) == (ErrorCode.INVALID, "static level must be in 0..4")


@pytest.mark.parametrize(("msg", "handler"), [
    (ListJobs(), "list_jobs"), (ShowJob(job_id=3), "show"), (JobLogs(job_id=3), "logs"),
    (CancelJob(job_id=3), "cancel"), (PauseJob(job_id=3), "pause"),
    (ResumeJob(job_id=3), "resume"), (JobCheckpoints(job_id=3), "checkpoints"),
    (ListJobs(owner="k1"), "list_jobs"), (ListFiles(owner=None), "list_files"),
    (AddFile(file_id="file-3", filename="t.jsonl", purpose="fine-tune"), "add_file"),
    (ShowFile(file_id="file-3"), "show_file"), (DeleteFile(file_id="file-3"), "delete_file"),
])
def test_job_requests_go_to_the_job_manager(msg: msgspec.Struct, handler: str) -> None:
    h = Harness()
    (reply,) = h.ask(msg)
    assert h.jobs.calls == [(handler, msg)]
    if handler == "list_jobs":
        assert isinstance(reply, JobList)
    elif handler == "list_files":
        assert isinstance(reply, FileList)
    else:
        assert reply == Error(request_id=None, code=ErrorCode.UNKNOWN_REQUEST,
                              message=f"{handler} 3" if "file" not in handler
                              else f"{handler} file-3")


def test_an_attach_is_answered_once_its_validation_is_done() -> None:
    h = Harness()
    spec = JobSpec(name="j", dataset="d.jsonl", output_dir="/out")
    assert h.ask(AttachJob(spec=spec)) == []  # validation runs on the attach thread
    assert h.jobs.calls == [("attach", AttachJob(spec=spec))]
    h.endpoint.reply_done()
    assert h.sock.sent == []  # not done yet: still waiting
    assert h.ask(GetStatus()) == [STATUS]  # other requests are served meanwhile
    h.jobs.attached.set_result(JobList(jobs=[]))
    h.endpoint.reply_done()
    assert h.sock.replies(b"tool")[-1] == JobList(jobs=[])
    h.endpoint.reply_done()
    assert len(h.sock.sent) == 2  # replied once


def test_a_failed_attach_is_an_internal_error() -> None:
    h = Harness()
    h.ask(AttachJob(spec=JobSpec(name="j", dataset="d.jsonl", output_dir="/out")))
    h.jobs.attached.set_exception(OSError("disk full"))
    h.endpoint.reply_done()
    e = error_of(h.sock.replies(b"tool"))
    assert e.code == ErrorCode.INTERNAL and "disk full" in e.message


@pytest.mark.parametrize(("payload", "code", "says"), [
    (b"\xc1", ErrorCode.MALFORMED, "MessagePack"),
    (msgspec.msgpack.encode({"type": "reboot"}), ErrorCode.INVALID, "reboot"),
    (msgspec.msgpack.encode({"type": "show_job", "job_id": 0}), ErrorCode.INVALID, "job_id"),
    (b"\x00" * (LIMIT + 1), ErrorCode.TOO_LARGE, f"limit of {LIMIT} bytes"),
])
def test_a_bad_request_gets_a_typed_error(payload: bytes, code: str, says: str) -> None:
    h = Harness()
    e = error_of(h.ask(payload))
    assert e.code == code and says in e.message and e.request_id is None
    assert h.jobs.calls == [] and h.policies == []


def test_a_request_type_without_a_handler_is_refused_by_name() -> None:
    h = Harness()
    del h.endpoint.handlers[GetStatus]
    e = error_of(h.ask(GetStatus()))
    assert e.code == ErrorCode.UNKNOWN_TYPE and "GetStatus" in e.message


def test_a_handler_that_breaks_is_an_internal_error_and_the_next_request_is_served() -> None:
    h = Harness()

    def broken(msg: Any) -> Any:
        raise RuntimeError("boom")

    h.endpoint.handlers[ListJobs] = broken
    e = error_of(h.ask(ListJobs()))
    assert e.code == ErrorCode.INTERNAL and "daemon log" in e.message
    assert h.ask(GetStatus()) == [STATUS]


def test_a_reply_to_a_client_that_has_gone_is_dropped() -> None:
    h = Harness()
    h.sock.gone.add(b"tool")
    assert h.ask(GetStatus()) == []
    assert h.ask(GetStatus(), client=b"other") == [STATUS]


@pytest.mark.parametrize(("payload", "code", "says"), [
    (b"\x91" * 500 + b"\xc0", ErrorCode.INVALID, "Expected `object`, got `array`"),
    (b"\x91" * 1020 + b"\xc0", ErrorCode.MALFORMED, "nested too deeply"),
    (b"hello", ErrorCode.MALFORMED, "MessagePack"),  # its first byte alone is a valid int
    (b"\xc1", ErrorCode.MALFORMED, "MessagePack"),
    (msgspec.msgpack.encode({"type": "show_job", "job_id": 2**63}), ErrorCode.INVALID,
     "job_id"),
    (msgspec.msgpack.encode({"type": "job_logs", "job_id": 1, "after_event": 2**64 - 1}),
     ErrorCode.INVALID, "after_event"),
    (msgspec.msgpack.encode({"type": "attach", "spec": {
        "name": "j", "dataset": "/d", "output_dir": "/o", "priority": 2**63}}),
     ErrorCode.INVALID, "priority"),
])
def test_a_hostile_frame_gets_a_typed_error_and_the_endpoint_still_serves(
        payload: bytes, code: str, says: str) -> None:
    h = Harness()
    e = error_of(h.ask(payload))
    assert e.code == code and says in e.message
    assert h.ask(GetStatus()) == [STATUS]


def test_the_metrics_page_round_trips_from_the_client_over_zmq(tmp_path: Any) -> None:
    """``ControlClient.metrics_page`` against the endpoint on a real ROUTER: what an HTTP front
    in another process does to serve the daemon's page on its own ``/metrics``."""
    import threading

    import zmq

    from harli.client.control import ControlClient
    from harli.daemon.metrics import Metrics

    metrics = Metrics()
    endpoint_url = f"ipc://{tmp_path}/control.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint_url)
    handlers = control_handlers(FakeJobs(), lambda: STATUS,  # type: ignore[arg-type]
                                lambda spec, slo: None, metrics.page)
    endpoint = ControlEndpoint(router, LIMIT, handlers)
    got: list[MetricsPage] = []

    def client() -> None:
        with ControlClient(endpoint_url, timeout_s=10) as c:
            got.append(c.metrics_page())

    t = threading.Thread(target=client)
    t.start()
    try:
        assert router.poll(10_000)
        endpoint.drain()
        t.join(10)
    finally:
        router.close(0)
    (page,) = got
    assert page.content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert "harli_decode_iterations_total 0.0" in page.text


class LiveEndpoint:
    """The endpoint on a real ROUTER, drained by a thread as the daemon's loop drains it."""

    def __init__(self, tmp_path: Any) -> None:
        import threading

        import zmq

        self.url = f"ipc://{tmp_path}/control.sock"
        self.router = zmq.Context.instance().socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.url)
        self.jobs = FakeJobs()
        self.endpoint = ControlEndpoint(self.router, LIMIT, control_handlers(
            self.jobs, lambda: STATUS, lambda spec, slo: None,  # type: ignore[arg-type]
            lambda tenant_series: PAGE))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            if self.router.poll(10):
                self.endpoint.drain()
            self.endpoint.reply_done()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.router.close(0)


SPEC = JobSpec(name="j", dataset="d.jsonl", output_dir="/out")


def test_the_async_client_is_not_held_up_by_a_request_answered_later(tmp_path: Any) -> None:
    """An attach whose answer comes later (the daemon checks its files) and a status on one
    connection: the status is answered first, the attach when its answer is ready, each
    to its own caller (replies carry the request id)."""
    import asyncio

    from harli.client.control import AsyncControlClient
    from harli.client.inference import RequestError
    from harli.ipc.control import DaemonStatus, JobInfo

    live = LiveEndpoint(tmp_path)

    async def main() -> None:
        client = AsyncControlClient(live.url, timeout_s=10)
        try:
            attach = asyncio.create_task(client.call(AttachJob(spec=SPEC), JobInfo))
            assert await client.call(GetStatus(), DaemonStatus) == STATUS
            assert await client.call(GetMetrics(), MetricsPage) == PAGE
            assert not attach.done()
            live.jobs.attached.set_result(Error(request_id=None, code=ErrorCode.INVALID,
                                                message="d.jsonl:3: not JSON"))
            with pytest.raises(RequestError, match=r"d\.jsonl:3"):
                await attach
        finally:
            await client.close()

    try:
        asyncio.run(main())
    finally:
        live.close()


def test_a_late_reply_is_never_read_as_the_next_requests(tmp_path: Any) -> None:
    from harli.client.control import ControlClient
    from harli.client.inference import RequestError
    from harli.ipc.control import DaemonStatus, JobInfo

    live = LiveEndpoint(tmp_path)
    try:
        with ControlClient(live.url, timeout_s=0.3) as c:
            with pytest.raises(RequestError, match="no reply"):
                c.call(AttachJob(spec=SPEC), JobInfo)
            live.jobs.attached.set_result(Error(request_id=None, code=ErrorCode.INVALID,
                                                message="late"))
            c.timeout_s = 10
            assert c.call(GetStatus(), DaemonStatus) == STATUS  # not the late attach's
    finally:
        live.close()
