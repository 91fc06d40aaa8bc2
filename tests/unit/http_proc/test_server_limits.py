"""The HTTP front's connection limits (``harli.http_proc.server_limits``) on a real uvicorn
server on loopback, with the protocol class the front uses (httptools and h11) and a trivial
ASGI app: slow-header connections are closed by the server, a head too large is refused, and
normal requests are answered while 200 slow connections are open, below and above the cap.

Bounds are one-sided and generous: a connection is asserted closed *by the server* within
30 s (the head timeout is 0.5 s), never before its timeout could have fired. The same
against a real daemon's front is measured by ``python -m harli.bench.slow_headers URL``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import resource
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn

from harli.bench.slow_headers import HALF_HEAD
from harli.config import ConfigError, HttpConfig, load
from harli.http_proc.server_limits import (
    FD_HEADROOM,
    ServerLimits,
    fit_open_files,
    server_config,
)

PARSERS = ["httptools", "h11"]
BOUND_S = 30.0  # generous: how long the server may take to close a connection it should


class App:
    """``/hold`` waits for ``release``; ``/sleep?S`` sleeps S seconds; anything else: ok."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.holding = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        if scope["path"] == "/hold":
            self.holding += 1
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        elif scope["path"] == "/sleep":
            await asyncio.sleep(float(scope["query_string"]))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def serve(limits: ServerLimits, parser: str, app: Any = None) -> Iterator[tuple[int, Any]]:
    """A uvicorn server with the front's config on a loopback port, in a thread: (port, the
    connection book of its protocol class)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    config = server_config(app or App(), limits, parser=parser, log_config=None,
                           log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + BOUND_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1], config.http_protocol_class.book
    finally:
        server.should_exit = True
        thread.join(BOUND_S)
        sock.close()


def connect(port: int, send: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)
    if send:
        s.sendall(send)
    return s


def closed_by_server(s: socket.socket, within_s: float = BOUND_S) -> bytes | None:
    """What the server sent before it closed ``s`` (None: still open after ``within_s``)."""
    s.settimeout(within_s)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return got


def get(port: int, path: str = "/health") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND_S)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_all_closed(book: Any) -> None:
    """Until the server counts no open connection (a leak in the count would, in time, hold
    every new connection past the cap)."""
    deadline = time.monotonic() + BOUND_S
    while book.open:
        assert time.monotonic() < deadline, f"{book.open} connections still counted"
        time.sleep(0.01)
    assert not book.waiting


@pytest.mark.parametrize("parser", PARSERS)
def test_silent_and_half_head_connections_are_closed_after_the_head_timeout(
        parser: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="harli.http_proc.server_limits")
    with serve(ServerLimits(header_timeout_s=0.5, keep_alive_timeout_s=60), parser) as (port,
                                                                                       book):
        t0 = time.monotonic()
        silent, half = connect(port), connect(port, HALF_HEAD)
        assert closed_by_server(silent) == b""
        assert closed_by_server(half) == b""
        assert time.monotonic() - t0 >= 0.5  # not before the timeout
        assert get(port) == (200, b"ok")
        wait_all_closed(book)
    assert book.closed["head_timeout"] == 2
    assert "closed without a whole request head in time" in caplog.text  # once a minute


@pytest.mark.parametrize("parser", PARSERS)
def test_the_timer_rearms_for_the_next_request_and_spares_slow_responses(parser: str) -> None:
    limits = ServerLimits(header_timeout_s=0.5, keep_alive_timeout_s=60)
    with serve(limits, parser) as (port, _):
        s = connect(port, b"GET /sleep?1.5 HTTP/1.1\r\nHost: t\r\n\r\n")  # head in time
        s.settimeout(BOUND_S)
        got = b""
        while not got.endswith(b"ok"):
            got += s.recv(65536)
        assert got.startswith(b"HTTP/1.1 200")  # the response outlived the head timeout
        s.sendall(HALF_HEAD)  # keep-alive: half of the next head, then nothing
        # uvicorn's keep-alive timer (60 s here) stops at the first byte; ours closes it.
        assert closed_by_server(s) == b""
        # Half a head pipelined behind a slow response: the response is not cut.
        s = connect(port, b"GET /sleep?1.5 HTTP/1.1\r\nHost: t\r\n\r\n" + HALF_HEAD)
        got = closed_by_server(s)
        assert got is not None and got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok")


@pytest.mark.parametrize(("parser", "status"), [("httptools", b"431"), ("h11", b"400")])
def test_a_head_too_large_is_refused_and_closed(parser: str, status: bytes) -> None:
    with serve(ServerLimits(max_header_bytes=4096), parser) as (port, _):
        got = closed_by_server(connect(port, HALF_HEAD + b"a" * 8192))
        assert got is not None and got.startswith(b"HTTP/1.1 " + status)
        assert get(port) == (200, b"ok")


@pytest.mark.parametrize("parser", PARSERS)
def test_normal_requests_are_served_with_200_slow_connections_open(parser: str) -> None:
    limits = ServerLimits(header_timeout_s=60, max_connections=1000)
    with serve(limits, parser) as (port, book):
        slow = [connect(port, HALF_HEAD) for _ in range(200)]
        try:
            for _ in range(20):
                assert get(port) == (200, b"ok")
            assert book.open >= 200  # they were all still there
        finally:
            for s in slow:
                s.close()
        wait_all_closed(book)


@pytest.mark.parametrize("parser", PARSERS)
def test_past_the_cap_the_longest_waiting_connections_make_room(parser: str) -> None:
    limits = ServerLimits(header_timeout_s=60, max_connections=50)
    with serve(limits, parser) as (port, book):
        slow = [connect(port, HALF_HEAD if i % 2 else b"") for i in range(200)]
        try:
            for _ in range(20):
                assert get(port) == (200, b"ok")
            assert book.open <= 50
            assert all(closed_by_server(s) is not None for s in slow[:150])  # oldest first
        finally:
            for s in slow:
                s.close()
        wait_all_closed(book)


@pytest.mark.parametrize("parser", PARSERS)
def test_with_every_connection_in_a_request_a_new_one_gets_503(parser: str) -> None:
    app = App()
    with serve(ServerLimits(max_connections=2), parser, app) as (port, _):
        held = [connect(port, b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n") for _ in range(2)]
        deadline = time.monotonic() + BOUND_S
        while app.holding < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, body = get(port)
        assert status == 503
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        app.release.set()
        for s in held:
            got = b""
            while not got.endswith(b"ok"):
                got += s.recv(65536)
            assert got.startswith(b"HTTP/1.1 200")
            s.close()
        assert get(port) == (200, b"ok")


def test_the_open_files_limit_is_raised_to_fit_the_connections() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        got = fit_open_files(10)
        assert got == soft  # already fits: left alone
        if soft != resource.RLIM_INFINITY:
            want = soft + FD_HEADROOM
            got = fit_open_files(soft)
            assert got == (want if hard == resource.RLIM_INFINITY else min(want, hard))
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (got, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_config_keys_default_validate_and_match_the_deploy_file() -> None:
    from pathlib import Path

    http = HttpConfig()
    assert (http.header_timeout_s, http.max_header_bytes, http.keep_alive_timeout_s,
            http.max_connections) == (10.0, 65536, 5, 2048)
    deployed = load(Path(__file__).resolve().parents[3] / "deploy" / "harli.toml").http
    assert ServerLimits.from_config(deployed) == ServerLimits.from_config(http)
    assert ServerLimits.from_config(http) == ServerLimits()
    assert load(None, ["http.header_timeout_s=0"]).http.header_timeout_s == 0  # off
    for bad in ("header_timeout_s=-1", "header_timeout_s=nan", "header_timeout_s=inf",
                "max_header_bytes=0", "keep_alive_timeout_s=0", "max_connections=0",
                "keep_alive_timeout_s=1.5"):
        with pytest.raises(ConfigError, match=f"http.{bad.split('=')[0]}"):
            load(None, [f"http.{bad}"])
