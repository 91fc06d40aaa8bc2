"""A fake ZMQ ROUTER for the daemon's endpoint tests: it feeds queued multipart messages to
``recv_multipart`` and keeps what is sent, decoded, per client. No ZMQ context, no process."""

from __future__ import annotations

from collections import deque
from typing import Any

import msgspec
import zmq


class FakeRouter:
    def __init__(self, reply_type: Any, envelope_frames: bool = False) -> None:
        """``envelope_frames``: a reply is its envelope (kept raw, in ``envelopes``) and one
        payload, as the control endpoint sends them; else every frame is a payload."""
        self.inbox: deque[list[bytes]] = deque()
        self.sent: list[tuple[bytes, list[Any]]] = []  # (client, decoded frames) per message
        self.envelope_frames = envelope_frames
        self.envelopes: list[list[bytes]] = []  # per message sent
        self.gone: set[bytes] = set()  # clients whose replies fail with EHOSTUNREACH
        self._decoder = msgspec.msgpack.Decoder(reply_type)

    def feed(self, client: bytes, *payloads: bytes) -> None:
        """Queue one message from ``client`` (a DEALER sends one payload frame)."""
        self.inbox.append([client, *payloads])

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        if not self.inbox:
            raise zmq.Again()
        return self.inbox.popleft()

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        client = frames[0]
        if client in self.gone:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        self.envelopes.append(frames[1:-1] if self.envelope_frames else [])
        body = frames[1 + len(self.envelopes[-1]):]
        self.sent.append((client, [self._decoder.decode(f) for f in body]))

    def replies(self, client: bytes) -> list[Any]:
        """Every frame sent to ``client``, in order."""
        return [m for c, frames in self.sent if c == client for m in frames]
