"""The HTTP front's channel to the daemon: what ``http_proc`` tells its supervisor.

The front serves requests as a client of the daemon's public inference and control endpoints;
this internal channel carries only its lifecycle (ready to serve, or a fatal error), as
decode's and the finetune's do.
"""

from __future__ import annotations

import msgspec


class _Internal(msgspec.Struct, tag=True, kw_only=True, array_like=True, frozen=True):
    pass


class HttpReady(_Internal, frozen=True):
    incarnation: int
    pid: int
    url: str  # where the API answers, e.g. http://127.0.0.1:8000


class HttpFatal(_Internal, frozen=True):
    incarnation: int
    error: str
    traceback: str


HttpToDaemon = HttpReady | HttpFatal
