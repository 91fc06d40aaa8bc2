"""Faults and lifecycle of the real daemon: decode_proc killed under load, SIGTERM with and
without requests in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from harli.bench.local_daemon import LocalDaemon, pid_alive
from harli.client.inference import AsyncInferenceClient, RequestError
from tests.procfs import arena_file, holders

from .conftest import make_daemon

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]


def _decode_pid(d: LocalDaemon) -> int:
    assert d.proc is not None
    kids = [p for p in psutil.Process(d.proc.pid).children()
            if "harli::decode" in " ".join(p.cmdline())]
    assert len(kids) == 1, kids
    return kids[0].pid


async def _load_then_kill(d: LocalDaemon, n: int) -> list[tuple[str, float]]:
    """Start n long streams, SIGKILL decode_proc mid-stream; return (outcome, seconds)."""
    async with AsyncInferenceClient(d.endpoint, timeout_s=30) as client:
        started = asyncio.Event()
        count = 0

        async def one(i: int) -> tuple[str, float]:
            nonlocal count
            kill_t = None
            try:
                async for _ in client.generate([i + 1, 2, 3], max_tokens=2000, ignore_eos=True):
                    count += 1
                    if count >= 3 * n:
                        started.set()
                return ("finished", 0.0)
            except RequestError as e:
                kill_t = killed_at[0]
                return (e.code, time.monotonic() - kill_t)

        killed_at = [0.0]
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.wait_for(started.wait(), 60)
        killed_at[0] = time.monotonic()
        os.kill(_decode_pid(d), signal.SIGKILL)
        return await asyncio.gather(*tasks)


def test_kill_decode_under_load_errors_inflight_and_restarts(
        tmp_path: Path, tiny_model: Path) -> None:
    with make_daemon(tmp_path, tiny_model) as d:
        old_pid = _decode_pid(d)
        outcomes = asyncio.run(_load_then_kill(d, 8))
        assert all(code == "decode_died" for code, _ in outcomes), outcomes
        assert max(dt for _, dt in outcomes) < 5.0
        # The daemon restarts decode_proc; new requests (sent before it is ready) succeed.
        with d.client(timeout_s=120) as c:
            out = c.complete([9, 9, 9], max_tokens=5, ignore_eos=True)
        assert len(out.token_ids) == 5
        assert _decode_pid(d) != old_pid and not pid_alive(old_pid)
        assert "decode[2] ready" in d.log_path.read_text()


def test_sigterm_idle_daemon_exits_clean(tmp_path: Path, tiny_model: Path) -> None:
    d = make_daemon(tmp_path, tiny_model)
    with d:
        kids = d.children()
        assert kids
        assert d.proc is not None
        arena = arena_file(d.proc.pid)  # an unnamed /dev/shm file; vLLM's KV cache lives there
        assert holders(*arena) & set(kids)
    assert d.proc is not None and d.proc.returncode == 0
    assert not any(pid_alive(p) for p in kids)
    run_dir = d.cfg.runtime_dir
    assert not list(run_dir.glob("*.sock")), list(run_dir.iterdir())
    assert holders(*arena) == set()


def test_sigterm_drains_then_aborts_inflight_with_shutdown(
        tmp_path: Path, tiny_model: Path) -> None:
    d = make_daemon(tmp_path, tiny_model, "daemon.drain_timeout_s=2.0")
    with d:
        kids = d.children()
        results: dict[str, object] = {}

        def short() -> None:
            with d.client(timeout_s=60) as c:
                results["short"] = c.complete([1, 2], max_tokens=30, ignore_eos=True)

        def long() -> None:
            with d.client(timeout_s=60) as c:
                results["long"] = c.complete([3, 4], max_tokens=2000, ignore_eos=True)

        threads = [threading.Thread(target=short), threading.Thread(target=long)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # both are streaming
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with d.client(timeout_s=10) as c, pytest.raises(RequestError) as ei:
            c.complete([5], max_tokens=2)
        assert ei.value.code == "shutting_down"
        for t in threads:
            t.join(60)
        assert d.proc.wait(60) == 0
    short_out, long_out = results["short"], results["long"]
    assert short_out.finish_reason == "length" and len(short_out.token_ids) == 30  # type: ignore[attr-defined]
    assert long_out.finish_reason == "shutdown"  # type: ignore[attr-defined]
    assert 0 < len(long_out.token_ids) < 2000  # type: ignore[attr-defined]
    assert not any(pid_alive(p) for p in kids)
    assert not list(d.cfg.runtime_dir.glob("*.sock"))
