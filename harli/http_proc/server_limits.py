"""The HTTP front's connection limits, as a uvicorn HTTP protocol: how long a connection may
take to send a request head, how large that head may grow, and how many connections may be
open at once.

uvicorn (0.55) bounds only the idle time between keep-alive requests (``timeout_keep_alive``,
armed when a response completes, cancelled by the next byte). A fresh connection that sends
nothing, or half a request head, is never timed out; with httptools (the parser uvicorn picks
when it is installed) a head has no size limit either (h11's ``max_incomplete_event_size``
bounds only h11). Its ``limit_concurrency`` counts every open connection, those still sending
their head included, and answers 503 past it, so a few hundred slow-header clients would turn
every real request into 503; the front leaves it unset. ``server_config`` builds the uvicorn
``Config`` of the front with a subclass of uvicorn's own protocol (httptools, else h11) that
adds:

- **a head timer** (``http.header_timeout_s``), armed when a connection opens and, on a
  kept-alive one, at the first byte of its next request; disarmed once the head is parsed. A
  connection it fires on is closed, as Go's ``ReadHeaderTimeout`` and nginx's
  ``client_header_timeout`` close it.
- **a head size cap** (``http.max_header_bytes``): a head still incomplete past it gets 431
  and is closed (with h11, h11's own ``max_incomplete_event_size`` answers 400 first).
- **a cap on open connections** (``http.max_connections``) that drains before it refuses, as
  nginx does when it runs out of connections (``ngx_drain_connections``): one more connection
  closes the connection that has waited longest for a request head (an idle keep-alive one,
  or one still sending its head: what uvicorn's own shutdown closes at once). Only when every
  other connection is in a request does the new one get 503 (after its head, with
  ``Connection: close``). Slow-header clients therefore cannot hold the front, however many.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from harli.http_proc.errors import error_body

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import Receive, Scope, Send

    from harli.config import HttpConfig

logger = logging.getLogger(__name__)

LOG_EVERY_S = 60.0  # at most one log line a minute about connections the limits closed
FD_HEADROOM = 256  # open files the front needs besides its connections (ZMQ, files, ...)


@dataclass(frozen=True)
class ServerLimits:
    header_timeout_s: float = 10.0  # 0: no head timer
    keep_alive_timeout_s: int = 5
    max_header_bytes: int = 65536
    max_connections: int = 2048

    @classmethod
    def from_config(cls, http: HttpConfig) -> ServerLimits:
        return cls(header_timeout_s=http.header_timeout_s,
                   keep_alive_timeout_s=http.keep_alive_timeout_s,
                   max_header_bytes=http.max_header_bytes,
                   max_connections=http.max_connections)


def server_config(app: Any, limits: ServerLimits, parser: str = "auto",
                  **kwargs: Any) -> uvicorn.Config:
    """uvicorn's ``Config`` for ``app`` under ``limits`` (``kwargs``: the rest of uvicorn's
    options). WebSockets are off: the front serves none, and an upgraded connection would
    leave this protocol's count of open connections."""
    import uvicorn

    return uvicorn.Config(app, http=protocol_class(limits, parser), ws="none",
                          timeout_keep_alive=limits.keep_alive_timeout_s,
                          h11_max_incomplete_event_size=limits.max_header_bytes, **kwargs)


def protocol_class(limits: ServerLimits, parser: str = "auto") -> type[asyncio.Protocol]:
    """A protocol class for one server: uvicorn's ``parser`` protocol (``auto``: httptools
    when installed, else h11, as uvicorn chooses) with ``limits``, and its own count of
    connections."""
    if parser == "auto":
        parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    if parser == "httptools":
        base: type[LimitedConnection] = _httptools_connection()
    elif parser == "h11":
        base = _H11Connection
    else:
        raise ValueError(f"parser: expected auto, httptools or h11, got {parser!r}")
    return cast("type[asyncio.Protocol]",
                type(base.__name__, (base,), {"book": ConnectionBook(limits)}))


class ConnectionBook:
    """One server's open connections: how many, those waiting for a request head (the
    longest-waiting first), and how many the limits closed, for the log."""

    def __init__(self, limits: ServerLimits, clock: Any = time.monotonic) -> None:
        self.limits = limits
        self.open = 0
        self.waiting: dict[LimitedConnection, None] = {}  # insertion order: longest first
        self.closed: Counter[str] = Counter()
        self._clock = clock
        self._logged_at = -math.inf
        self._logged: Counter[str] = Counter()
        self._flush_pending = False

    def longest_waiting(self) -> LimitedConnection | None:
        return next(iter(self.waiting), None)

    def note(self, reason: str, loop: asyncio.AbstractEventLoop) -> None:
        """Count a connection the limits closed or refused; the counts are logged at most
        once a minute (a warning when the cap was reached, else info)."""
        self.closed[reason] += 1
        if self._flush_pending:
            return
        wait_s = self._logged_at + LOG_EVERY_S - self._clock()
        if wait_s <= 0:
            self._flush()
        else:
            self._flush_pending = True
            loop.call_later(wait_s, self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        since = self.closed - self._logged
        if not since:
            return
        self._logged_at, self._logged = self._clock(), self.closed.copy()
        level = logging.WARNING if since["drained"] or since["refused"] else logging.INFO
        logger.log(level, "[http] connection limits: %s; %d connections open "
                   "(http.header_timeout_s=%g, http.max_header_bytes=%d, "
                   "http.max_connections=%d)",
                   ", ".join(f"{n} {_REASONS[r]}" for r, n in sorted(since.items())),
                   self.open, self.limits.header_timeout_s, self.limits.max_header_bytes,
                   self.limits.max_connections)


_REASONS = {"head_timeout": "closed without a whole request head in time",
            "head_too_large": "closed with a request head too large (431)",
            "drained": "closed while waiting for a head, to make room",
            "refused": "answered 503 with every connection in a request"}


class LimitedConnection(asyncio.Protocol):
    """What the limits add to a uvicorn HTTP protocol. The parser-specific subclasses say
    when a request head starts (``_head_started``) and when it is parsed (``_head_done``)."""

    book: ClassVar[ConnectionBook]
    # Set by uvicorn's protocol classes.
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any  # the RequestResponseCycle of the latest request head, None before the first
    app: Any

    _counted = False
    _in_head = False
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        book = self.book
        book.open += 1
        self._counted = True
        if book.open > book.limits.max_connections:
            oldest = book.longest_waiting()
            if oldest is not None:
                oldest._close("drained")
            else:  # every other connection is in a request: 503 once this head is read
                self.app = _too_many_connections
                book.note("refused", self.loop)
        book.waiting[self] = None
        if book.limits.header_timeout_s:
            self._head_timer = self.loop.call_later(book.limits.header_timeout_s,
                                                    self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._counted or self.transport.is_closing():
            return
        if self._in_head:  # a head still incomplete after these bytes
            self._head_bytes += len(data)
            if self._head_bytes > self.book.limits.max_header_bytes:
                self._refuse_head()
                return
        self._sync_waiting()

    def on_response_complete(self) -> None:
        cast(Any, super()).on_response_complete()  # uvicorn's protocols all have it
        if self._counted and not self.transport.is_closing():
            self._sync_waiting()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def _head_started(self) -> None:
        """The first bytes of a request head arrived."""
        if not self._in_head:
            self._in_head, self._head_bytes = True, 0
        timeout_s = self.book.limits.header_timeout_s
        if timeout_s and self._head_timer is None:
            self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

    def _head_done(self) -> None:
        """A request head was parsed (or the connection cannot send another)."""
        self._in_head, self._head_bytes = False, 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _sync_waiting(self) -> None:
        """In a request (its response not complete), or waiting for the next head: the
        state in which uvicorn's own shutdown closes a connection at once."""
        if self.cycle is None or self.cycle.response_complete:
            self.book.waiting.setdefault(self, None)  # keeps its place if it was waiting
        else:
            self.book.waiting.pop(self, None)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A head pipelined behind a response still being sent (httptools parses it at
            # once): the server is the slow one, so give it another period.
            self._head_timer = self.loop.call_later(self.book.limits.header_timeout_s,
                                                    self._head_timed_out)
            return
        self._close("head_timeout")

    def _refuse_head(self) -> None:
        msg = (f"request head over {self.book.limits.max_header_bytes} bytes "
               f"(http.max_header_bytes)")
        body = json.dumps(error_body(msg, "BadRequestError", code="request_header_too_large"))
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json"
            b"\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body.encode()))
        self._close("head_too_large")

    def _close(self, reason: str) -> None:
        self._release()
        self.book.note(reason, self.loop)
        if not self.transport.is_closing():
            self.transport.close()

    def _release(self) -> None:
        """Out of the count (idempotent: on our close, then again when uvicorn sees it)."""
        self._head_done()
        if self._counted:
            self._counted = False
            self.book.open -= 1
            self.book.waiting.pop(self, None)


class _H11Connection(LimitedConnection, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()  # from data_received, and after a response completes
        if self.conn.their_state is not h11.IDLE:
            self._head_done()  # a head was parsed (or the connection is in error or closed)
        elif self.conn.trailing_data[0]:
            self._head_started()  # part of a head is buffered


def _httptools_connection() -> type[LimitedConnection]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class _HttpToolsConnection(LimitedConnection, HttpToolsProtocol):
        def on_message_begin(self) -> None:  # httptools: the first byte of a request
            super().on_message_begin()
            self._head_started()

        def on_headers_complete(self) -> None:
            self._head_done()
            super().on_headers_complete()

    return _HttpToolsConnection


async def _too_many_connections(scope: Scope, receive: Receive, send: Send) -> None:
    body = json.dumps(error_body(
        "too many connections (http.max_connections), every one in a request; retry later",
        "ServiceUnavailableError", code="too_many_connections")).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})


def fit_open_files(max_connections: int) -> int:
    """Raise this process's soft limit on open files to ``max_connections`` + headroom, as
    far as the hard limit allows (as vLLM's ``set_ulimit`` does); the soft limit now. Past it
    a connection fails at accept, before any of these limits sees it."""
    want = max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError) as e:
        logger.warning("[http] cannot raise the open-files limit to %d: %s", new, e)
        new = soft
    if new < want:
        logger.warning("[http] the open-files limit (%d) is below http.max_connections + %d "
                       "= %d: connections past it fail at accept; raise LimitNOFILE or lower "
                       "http.max_connections", new, FD_HEADROOM, want)
    return new
