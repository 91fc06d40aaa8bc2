"""``MetricsServer``: the daemon's Prometheus HTTP endpoint, ``GET /metrics`` and nothing else.

prometheus-client's own server answers every path with the page and refuses ``HEAD``; a
scraper or router pointed at a wrong path would then read metrics where it expected a 404.
Here ``/metrics`` answers ``GET`` and ``HEAD`` (the page as prometheus-client renders it, with
its content negotiation and gzip), any other path is 404 and any other method 405, each with a
one-line text. One thread per request, daemon threads: a slow scraper never holds the loop.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

METRICS_PATH = "/metrics"
_ALLOWED = ("GET", "HEAD")

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def metrics_app(registry: CollectorRegistry) -> WsgiApp:
    """The WSGI app: the registry's page on ``/metrics`` (GET, HEAD), 404 / 405 elsewhere."""
    page: WsgiApp = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if environ.get("PATH_INFO") != METRICS_PATH:
            return _text(start_response, "404 Not Found",
                         f"not found: the metrics are at {METRICS_PATH}\n")
        if method not in _ALLOWED:
            return _text(start_response, "405 Method Not Allowed",
                         f"method {method} not allowed: use GET or HEAD\n",
                         [("Allow", ", ".join(_ALLOWED))])
        if method == "GET":
            return page(environ, start_response)
        # HEAD: GET's status and headers, its length, no body (prometheus-client refuses it).
        got: list[Any] = []
        body = b"".join(page({**environ, "REQUEST_METHOD": "GET"},
                             lambda status, headers, *_: got.extend((status, headers))))
        status, headers = got
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return []

    return app


def _text(start_response: StartResponse, status: str, text: str,
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *(headers or [])])
    return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # the base class names it
        pass  # a scrape every few seconds is not worth a log line


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, addr: str, port: int) -> None:
        """Bind ``addr``:``port`` (OSError if it cannot) and serve on a daemon thread."""
        family, host = _family(addr, port)

        class Server(ThreadingWSGIServer):
            address_family = family

        self._httpd = make_server(host, port, metrics_app(registry), Server,
                                  handler_class=_QuietHandler)
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _family(addr: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family and host to bind for ``addr`` (an IPv6 address needs AF_INET6)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
    return family, str(sockaddr[0])
