"""``Dispatcher``: the messages of one internal socket (from decode_proc, its telemetry, or
finetune_proc), decoded with the socket's typed decoder and routed by a table
``{message type: handler}`` built once.

Only our own children write to these sockets, so a message that does not decode, or whose type
has no handler, is a bug to report: it is logged, counted in ``harli_daemon_dropped_messages``
and dropped, and the loop goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from harli.daemon.metrics import Metrics
from harli.ipc.codec import DecodeFailure, Decoder

logger = logging.getLogger(__name__)

# Messages handled per socket per loop turn, so one busy socket cannot starve the others.
DRAIN_BATCH = 256

Handler = Callable[[Any], None]


class Dispatcher:
    def __init__(self, source: str, message_type: Any, handlers: Mapping[type[Any], Handler],
                 metrics: Metrics) -> None:
        """``source`` names the sender in logs and metrics; ``message_type`` is the union of
        what it sends."""
        self.source = source
        self.handlers = dict(handlers)
        self._decoder: Decoder[Any] = Decoder(message_type)
        self._metrics = metrics

    def drain(self, sock: zmq.Socket[Any]) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.dispatch(data)

    def dispatch(self, data: bytes) -> None:
        try:
            msg = self._decoder.decode(data)
        except DecodeFailure as e:
            logger.error("[daemon] undecodable message from %s: %s", self.source, e)
            self._dropped("undecodable")
            return
        handler = self.handlers.get(type(msg))
        if handler is None:
            logger.error("[daemon] no handler for %s from %s; dropped", type(msg).__name__,
                         self.source)
            self._dropped("unhandled")
            return
        try:
            handler(msg)
        except Exception:  # a handler's bug must not end the daemon's loop
            logger.exception("[daemon] handling %s from %s failed; dropped",
                             type(msg).__name__, self.source)
            self._dropped("handler_error")

    def _dropped(self, reason: str) -> None:
        self._metrics.dropped_messages.labels(self.source, reason).inc()
