"""Slow-header clients against a running HTTP front: ``n_slow`` connections that send half a
request head and stop, then ``GET /health`` and small ``/v1/completions`` timed on fresh
connections meanwhile, and when the front closed the slow ones (``http.header_timeout_s``).

``python -m harli.bench.slow_headers [URL]`` prints the result as JSON (URL defaults to
``http://127.0.0.1:8000``, a daemon's front without API keys).
"""

from __future__ import annotations

import json
import math
import socket
import time
from typing import Any

# Half a request head: a request line and one header, never ended.
HALF_HEAD = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: "


def measure(base: str, n_slow: int = 200, n_health: int = 20, n_completions: int = 5,
            watch_s: float = 30.0) -> dict[str, Any]:
    """Open ``n_slow`` half-head connections to the front at ``base``, then time GET /health
    and small /v1/completions on fresh connections; watch the slow ones for ``watch_s``."""
    import httpx

    host, port = base.split("//")[1].rsplit(":", 1)
    t0 = time.monotonic()
    slow = [socket.create_connection((host, int(port))) for _ in range(n_slow)]
    for s in slow:
        s.sendall(HALF_HEAD)
        s.setblocking(False)
    opened_s = time.monotonic() - t0
    lat: dict[str, list[float]] = {"health": [], "completions": []}
    codes: list[int] = []
    with httpx.Client(base_url=base, timeout=60) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        for kind, n in (("health", n_health), ("completions", n_completions)):
            for _ in range(n):
                t = time.monotonic()
                with httpx.Client(base_url=base, timeout=60) as fresh:  # a new connection
                    r = (fresh.get("/health") if kind == "health" else fresh.post(
                        "/v1/completions", json={"model": model, "prompt": "The river",
                                                 "max_tokens": 4, "temperature": 0}))
                lat[kind].append(time.monotonic() - t)
                codes.append(r.status_code)
    closed_at: dict[int, float] = {}
    while len(closed_at) < n_slow and time.monotonic() - t0 < watch_s:
        for i, s in enumerate(slow):
            if i in closed_at:
                continue
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                closed_at[i] = time.monotonic() - t0
        time.sleep(0.05)
    for s in slow:
        s.close()

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return round(1000 * xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)], 1)

    open_s = sorted(closed_at.values())
    return {"slow": n_slow, "opened_in_s": round(opened_s, 2), "statuses": sorted(set(codes)),
            **{f"{k}_ms_p50": pct(v, 0.5) for k, v in lat.items()},
            **{f"{k}_ms_p95": pct(v, 0.95) for k, v in lat.items()},
            "slow_closed_by_server": len(open_s), "watched_s": watch_s,
            "slow_open_s_min": round(open_s[0], 1) if open_s else None,
            "slow_open_s_max": round(open_s[-1], 1) if open_s else None}


if __name__ == "__main__":
    import sys

    print(json.dumps(measure(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000")))
