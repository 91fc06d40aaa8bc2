"""Fixtures that start the real daemon (which starts the real vLLM) on the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harli.bench.local_daemon import LocalDaemon

# float32 keeps greedy argmax stable across batch shapes, so the daemon and vLLM's offline
# path can be compared token for token.
# A fixed quota level (static:2): these tests are about serving and jobs, not the policy
# (test_scheduler_live.py runs the harli policy).
BASE_OVERRIDES = ['model.dtype="float32"', "decode.max_num_seqs=32", 'scheduler.policy="static:2"',
                  "supervisor.backoff_initial_s=0.2"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harli.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def run_engine_script(script: str, *args: str) -> dict[str, object]:
    """Run ``script`` in a child with decode_proc's environment; it prints ``RESULT <json>``."""
    import json
    import subprocess
    import sys

    from harli.config import child_environ, load

    res = subprocess.run([sys.executable, "-c", script, *args], env=child_environ(load(None)),
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    out: dict[str, object] = json.loads(line[len("RESULT "):])
    return out


def make_daemon(base: Path, tiny_model: Path, *extra: str,
                client_key: str | None = None) -> LocalDaemon:
    # Tests put each job's output under their own tmp_path, a sibling of ``base`` under
    # pytest's base temp dir: that is the operator's extra output root here.
    return LocalDaemon(base, [f'model.path="{tiny_model}"', *BASE_OVERRIDES,
                              f'finetune.extra_output_roots=["{base.parent}"]', *extra],
                       client_key=client_key)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[LocalDaemon]:
    """One daemon shared by a module's tests (tests that kill it make their own)."""
    d = make_daemon(tmp_path_factory.mktemp("daemon"), tiny_model,
                    "endpoints.max_message_bytes=65536")
    with d:
        yield d


def free_port() -> int:
    """A TCP port free on loopback now (for a daemon's http.port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(base: str, daemon: LocalDaemon, timeout_s: float = 90) -> None:
    """Until the daemon's HTTP front answers /health with 200."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"no /health at {base}; log:\n{daemon.log_tail()}")
