"""``ControlEndpoint``: the transport of the control API (``harli attach`` / ``jobs`` / ``job`` /
``status``).

It reads requests from the daemon's control ROUTER, hands them to the ``JobManager`` and
replies; a request answered later (attach validation runs on a worker thread) is kept as a
future and replied to from the daemon's loop once it is done. Malformed, unknown or oversized
messages get a typed ``Error``; nothing a client sends stops the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import zmq

from harli.daemon.job_manager import JobManager
from harli.ipc.codec import DecodeFailure, Decoder, encode, router_batch
from harli.ipc.control import ControlRequest, DaemonStatus, GetStatus, SetLevel, SetPolicy
from harli.ipc.inference import Error, ErrorCode

logger = logging.getLogger(__name__)



class ControlEndpoint:
    def __init__(self, sock: zmq.Socket[Any], jobs: JobManager, max_message_bytes: int,
                 status: Callable[[], DaemonStatus],
                 set_policy: Callable[[str, float | None], None]) -> None:
        self.sock = sock
        self.jobs = jobs
        self.status = status
        self.set_policy = set_policy
        self.max_message_bytes = max_message_bytes
        self._decoder: Decoder[ControlRequest] = Decoder(ControlRequest)
        self._pending: list[tuple[bytes, Future[Any]]] = []

    def drain(self) -> None:
        for client, _, payload in router_batch(self.sock):
            reply: Any
            try:
                if len(payload) > self.max_message_bytes:
                    raise DecodeFailure(ErrorCode.TOO_LARGE,
                                        f"message of {len(payload)} bytes exceeds the limit of "
                                        f"{self.max_message_bytes} bytes")
                msg = self._decoder.decode(payload)
                if isinstance(msg, SetLevel | SetPolicy):
                    # A fixed level is the static policy, so no other policy overrides it.
                    if isinstance(msg, SetPolicy):
                        self.set_policy(msg.policy, msg.tpot_slo_ms)
                    else:
                        self.set_policy(f"static:{msg.level}", None)
                    reply = self.status()
                elif isinstance(msg, GetStatus):
                    reply = self.status()
                else:
                    reply = self.jobs.handle(msg)
            except DecodeFailure as e:
                reply = Error(request_id=None, code=e.code, message=e.message)
            except ValueError as e:  # a well-formed request with a value out of range
                reply = Error(request_id=None, code=ErrorCode.INVALID, message=str(e))
            except Exception:
                logger.exception("[control] internal error")
                reply = Error(request_id=None, code=ErrorCode.INTERNAL,
                              message="internal error; see the daemon log")
            if isinstance(reply, Future):
                self._pending.append((client, reply))
            else:
                self._reply(client, reply)

    def reply_done(self) -> None:
        """Reply to deferred requests whose work has finished."""
        if not self._pending:
            return
        still = []
        for client, fut in self._pending:
            if not fut.done():
                still.append((client, fut))
                continue
            try:
                reply = fut.result()
            except Exception as e:
                logger.exception("[control] attach failed")
                reply = Error(request_id=None, code=ErrorCode.INTERNAL, message=repr(e))
            self._reply(client, reply)
        self._pending = still

    def _reply(self, client: bytes, reply: Any) -> None:
        try:
            self.sock.send_multipart([client, encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("[control] could not reply: %s", e)
