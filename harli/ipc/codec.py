"""Encoding and typed decoding of the wire structs, with errors that name the problem."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import msgspec
import zmq

from harli.ipc.inference import ClientMessage, ErrorCode

T = TypeVar("T")
logger = logging.getLogger(__name__)

# msgspec decodes nested containers recursively and raises RecursionError past the
# interpreter's limit (a 2 KB frame of nested one-element arrays reaches it): that is a
# malformed message like any other, never an exception for the caller's loop.
_TOO_DEEP = "nested too deeply to decode"


class DecodeFailure(Exception):
    """A message that could not be decoded; ``code`` is an ``ErrorCode`` value."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Decoder(Generic[T]):
    """A typed MessagePack decoder for one socket's union of message types."""

    def __init__(self, type_: Any) -> None:
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type_)

    def decode(self, data: bytes | memoryview) -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as e:
            invalid = e
        except msgspec.DecodeError as e:
            raise DecodeFailure(ErrorCode.MALFORMED, f"not valid MessagePack: {e}") from None
        except RecursionError:
            raise DecodeFailure(ErrorCode.MALFORMED, _TOO_DEEP) from None
        # The typed decoder stops at the first value of a wrong type, before reading the rest:
        # bytes that are not MessagePack at all (b"hello" starts with a valid fixint) would be
        # "invalid" then. Reading them untyped tells the two apart.
        try:
            raw = _ANY.decode(data)
        except msgspec.DecodeError as err:
            raise DecodeFailure(ErrorCode.MALFORMED, f"not valid MessagePack: {err}") from None
        except RecursionError:
            raise DecodeFailure(ErrorCode.MALFORMED, _TOO_DEEP) from None
        raise self._refused(raw, invalid)

    def _refused(self, raw: Any, e: msgspec.ValidationError) -> DecodeFailure:
        """The failure of well-formed MessagePack ``raw`` that is no valid message."""
        return DecodeFailure(ErrorCode.INVALID, str(e))


_ANY = msgspec.msgpack.Decoder()
_CLIENT_TAGS = frozenset({"hello", "generate", "abort"})


class ClientDecoder(Decoder[ClientMessage]):
    """Decoder for client messages that tells a non-map or an unknown ``type`` from a bad
    field."""

    def __init__(self) -> None:
        super().__init__(ClientMessage)

    def _refused(self, raw: Any, e: msgspec.ValidationError) -> DecodeFailure:
        if not isinstance(raw, dict):
            return DecodeFailure(ErrorCode.MALFORMED,
                                 f"expected a map with a 'type' field, got {type(raw).__name__}")
        tag = raw.get("type")
        if tag not in _CLIENT_TAGS:
            return DecodeFailure(
                ErrorCode.UNKNOWN_TYPE,
                f"unknown message type {tag!r}; expected one of {sorted(_CLIENT_TAGS)}")
        return super()._refused(raw, e)


def drain(sock: Any, decoder: Decoder[T], timeout_ms: int, role: str) -> Iterator[T]:
    """Wait up to ``timeout_ms`` for input on ``sock``, then yield every queued message,
    decoded. An undecodable one is logged and dropped: only our own daemon writes to a child's
    input socket, so it is a bug to report, never a reason to stop the loop."""
    if not sock.poll(timeout_ms):
        return
    while True:
        try:
            data = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            msg = decoder.decode(data)
        except DecodeFailure as e:
            logger.error("[%s] dropped an undecodable message from the daemon: %s", role, e)
            continue
        yield msg


def router_batch(sock: Any, max_messages: int = 256) -> Iterator[tuple[bytes, list[bytes],
                                                                        bytes]]:
    """(client identity, all frames, payload) of each message waiting on a ROUTER socket, at
    most ``max_messages`` per call so one busy socket cannot starve the daemon's other work."""
    for _ in range(max_messages):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        yield frames[0], frames, frames[-1]


def request_id_of(data: bytes | memoryview) -> str | None:
    """Best-effort request id of an undecodable message, so its error can be attributed."""
    try:
        raw = _ANY.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(raw, dict):
        rid = raw.get("request_id")
        if isinstance(rid, str):
            return rid
    return None


encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return encoder.encode(msg)
