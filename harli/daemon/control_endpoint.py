"""``ControlEndpoint``: the transport of the control API (``harli attach`` / ``jobs`` / ``job`` /
``status`` / ``policy`` / ``level``, the metrics page, and the HTTP front's jobs and files).

It reads requests from the daemon's control ROUTER, routes each by its type through a table
``{request type: handler}`` (``control_handlers``: the job requests to the ``JobManager``,
status and quota requests to the daemon) and replies. A request answered later (attach
validation runs on a worker thread) is kept as a future and replied to from the daemon's loop
once it is done. Malformed, unknown or oversized messages get a typed ``Error``; nothing a
client sends stops the loop.

A request's frames before its payload (after the client's identity) are its envelope, echoed
on its reply: a client that sends a request id there (``ControlClient``,
``AsyncControlClient``) matches replies to requests with it, so many may be in flight on one
connection and a late reply is never taken for another's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import zmq

from harli.daemon.job_manager import JobManager, Reply
from harli.ipc.codec import DecodeFailure, Decoder, encode, router_batch
from harli.ipc.control import (
    AddFile,
    AttachJob,
    CancelJob,
    ControlRequest,
    DaemonStatus,
    DeleteFile,
    GetMetrics,
    GetStatus,
    JobCheckpoints,
    JobLogs,
    ListFiles,
    ListJobs,
    MetricsPage,
    PauseJob,
    ResumeJob,
    SetLevel,
    SetPolicy,
    ShowFile,
    ShowJob,
)
from harli.ipc.inference import Error, ErrorCode

logger = logging.getLogger(__name__)

ControlHandler = Callable[[Any], Reply | Future[Reply]]


def control_handlers(jobs: JobManager, status: Callable[[], DaemonStatus],
                     set_policy: Callable[[str, float | None], None],
                     metrics_page: Callable[[bool], MetricsPage],
                     models: Mapping[type[Any], ControlHandler] | None = None,
                     ) -> dict[type[Any], ControlHandler]:
    """The control API's table. ``set_policy(spec, tpot_slo_ms)`` raises ``ValueError`` for a
    policy or SLO it refuses; ``metrics_page(tenant_series)``: the Prometheus page
    (``Metrics.page``);
    ``models``: the handlers of ``ListModels``, ``AddAdapter`` and ``RemoveAdapter`` (the
    daemon's ``ModelCatalog``)."""

    def policy(msg: SetPolicy) -> DaemonStatus:
        set_policy(msg.policy, msg.tpot_slo_ms)
        return status()

    def level(msg: SetLevel) -> DaemonStatus:
        # A fixed level is the static policy, so no other policy overrides it.
        set_policy(f"static:{msg.level}", None)
        return status()

    return {GetStatus: lambda _: status(), GetMetrics: lambda m: metrics_page(m.tenant_series),
            SetPolicy: policy, SetLevel: level,
            AttachJob: jobs.attach, ListJobs: jobs.list_jobs, ShowJob: jobs.show,
            JobLogs: jobs.logs, CancelJob: jobs.cancel, PauseJob: jobs.pause,
            ResumeJob: jobs.resume, JobCheckpoints: jobs.checkpoints, AddFile: jobs.add_file,
            ListFiles: jobs.list_files, ShowFile: jobs.show_file, DeleteFile: jobs.delete_file,
            **(models or {})}


class ControlEndpoint:
    def __init__(self, sock: zmq.Socket[Any], max_message_bytes: int,
                 handlers: Mapping[type[Any], ControlHandler]) -> None:
        self.sock = sock
        self.max_message_bytes = max_message_bytes
        self.handlers = dict(handlers)
        self._decoder: Decoder[ControlRequest] = Decoder(ControlRequest)
        # (identity and envelope, the answer to come)
        self._pending: list[tuple[list[bytes], Future[Reply]]] = []

    def drain(self) -> None:
        for _, frames, payload in router_batch(self.sock):
            route = frames[:-1]
            reply = self._answer(payload)
            if isinstance(reply, Future):
                self._pending.append((route, reply))
            else:
                self._reply(route, reply)

    def reply_done(self) -> None:
        """Reply to deferred requests whose work has finished."""
        if not self._pending:
            return
        still = []
        for route, fut in self._pending:
            if not fut.done():
                still.append((route, fut))
                continue
            try:
                reply = fut.result()
            except Exception as e:
                logger.exception("[control] attach failed")
                reply = Error(request_id=None, code=ErrorCode.INTERNAL, message=repr(e))
            self._reply(route, reply)
        self._pending = still

    def _answer(self, payload: bytes) -> Reply | Future[Reply]:
        try:
            if len(payload) > self.max_message_bytes:
                raise DecodeFailure(ErrorCode.TOO_LARGE,
                                    f"message of {len(payload)} bytes exceeds the limit of "
                                    f"{self.max_message_bytes} bytes")
            msg = self._decoder.decode(payload)
            handler = self.handlers.get(type(msg))
            if handler is None:  # a request type this daemon does not serve
                logger.error("[control] no handler for %s", type(msg).__name__)
                return Error(request_id=None, code=ErrorCode.UNKNOWN_TYPE,
                             message=f"this daemon does not handle {type(msg).__name__} "
                                     f"requests")
            return handler(msg)
        except DecodeFailure as e:
            return Error(request_id=None, code=e.code, message=e.message)
        except ValueError as e:  # a well-formed request with a value out of range
            return Error(request_id=None, code=ErrorCode.INVALID, message=str(e))
        except Exception:
            logger.exception("[control] internal error")
            return Error(request_id=None, code=ErrorCode.INTERNAL,
                         message="internal error; see the daemon log")

    def _reply(self, route: list[bytes], reply: Reply) -> None:
        try:
            self.sock.send_multipart([*route, encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("[control] could not reply: %s", e)
