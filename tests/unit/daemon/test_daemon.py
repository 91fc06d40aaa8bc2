"""The ``Daemon``'s wiring, built on fake processes (no child is spawned): its dispatch tables
cover every message a child sends, what a child's undecodable or unhandled message leads to, the
null objects that stand in for a disabled finetune, and the release of what it opened when it
cannot start."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import pytest

from harli.config import HarliConfig, load
from harli.daemon.daemon import Daemon
from harli.daemon.disabled import NullChild, NullMemory, NullScheduler
from harli.daemon.dispatch import Dispatcher
from harli.daemon.metrics import JOB_SERIES_KEEP_S, Metrics
from harli.ipc.codec import encode
from harli.ipc.control import GetMetrics, GetStatus, MetricsPage, SetPolicy
from harli.ipc.decode import (
    DecodeToDaemon,
    IterationTelemetry,
    Ready,
    RuntimeInfo,
    Shutdown,
)
from harli.ipc.finetune import FinetuneToDaemon, JobEnded, MicroStepReport
from harli.ipc.jobs import JobSpec
from harli.predictor import ProfileError

from .fake_procs import FakeOps


def _cfg(tmp_path: Path, *extra: str) -> HarliConfig:
    return load(None, [f'daemon.runtime_dir="{tmp_path / "run"}"',
                       f'daemon.state_dir="{tmp_path / "state"}"', "memory.arena=false",
                       f'model.path="{tmp_path / "model"}"', 'decode.cpu_cores="none"',
                       "metrics.port=0", "http.port=0", *extra])


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(_cfg(tmp_path), ops=FakeOps())
    try:
        yield d
    finally:
        d._close()


def test_each_child_socket_has_a_handler_for_every_message_it_carries(daemon: Daemon) -> None:
    assert set(daemon._from_decode.handlers) == set(get_args(DecodeToDaemon))
    assert set(daemon._from_finetune.handlers) == set(get_args(FinetuneToDaemon))
    assert set(daemon._from_telemetry.handlers) == {IterationTelemetry}


def test_an_undecodable_or_unhandled_message_is_counted_and_dropped() -> None:
    metrics, seen = Metrics(), []
    d = Dispatcher("decode", DecodeToDaemon | Shutdown, {Shutdown: seen.append}, metrics)
    d.dispatch(b"\xc1")
    d.dispatch(encode(GetStatus()))  # a message of another channel
    d.dispatch(encode(IterationTelemetry(
        incarnation=1, iteration=1, start_s=0, end_s=1, num_running=0, num_waiting=0,
        decode_tokens=0, prefill_tokens=0, context_tokens=0, kv_blocks_total=1,
        kv_blocks_free=1)))
    msg = Shutdown(reason="x")
    d.dispatch(encode(msg))
    d.dispatch(encode(Ready(incarnation=1, pid=1, info=RuntimeInfo(
        model="m", max_model_len=8, kv_blocks_total=1, block_size=1, vllm_version="v",
        device="cpu"))))
    assert seen == [msg]

    def dropped(reason: str) -> float | None:
        return metrics.registry.get_sample_value(
            "harli_daemon_dropped_messages_total", {"source": "decode", "reason": reason})

    assert (dropped("undecodable"), dropped("unhandled")) == (3, 1)


def test_a_handler_that_raises_is_counted_and_the_next_message_still_handled() -> None:
    metrics, seen = Metrics(), []

    def handler(msg: Shutdown) -> None:
        if msg.reason == "bad":
            raise RuntimeError("a bug in a handler")
        seen.append(msg)

    d = Dispatcher("decode", DecodeToDaemon | Shutdown, {Shutdown: handler}, metrics)
    d.dispatch(b"\x91" * 5000 + b"\xc0")  # nested past the decoder's recursion limit
    d.dispatch(encode(Shutdown(reason="bad")))
    d.dispatch(encode(Shutdown(reason="ok")))
    assert seen == [Shutdown(reason="ok")]
    for reason in ("undecodable", "handler_error"):
        assert metrics.registry.get_sample_value(
            "harli_daemon_dropped_messages_total", {"source": "decode", "reason": reason}) == 1


def test_a_disabled_finetune_is_a_null_child_with_nothing_to_schedule(tmp_path: Path) -> None:
    d = Daemon(_cfg(tmp_path, "finetune.enabled=false"), ops=FakeOps())
    try:
        assert isinstance(d.finetune, NullChild) and isinstance(d.scheduler, NullScheduler)
        assert isinstance(d.memory, NullMemory)
        assert d.children == (d.decode,)
        for child in d.children:
            child.start(0.0)
        d._tick(0.0)
        status = d.status()
        assert [c.name for c in status.children] == ["decode"] and status.scheduler is None
        handler = d.control_endpoint.handlers[SetPolicy]
        with pytest.raises(ValueError, match=r"finetune\.enabled = false"):
            handler(SetPolicy(policy="naive"))
    finally:
        d._close()


def test_a_daemon_that_cannot_start_releases_its_sockets(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, f'predictor.profile="{tmp_path / "missing.json"}"')
    with pytest.raises(ProfileError, match="cannot read"):
        Daemon(cfg, ops=FakeOps())
    assert not list((tmp_path / "run").glob("*.sock"))  # every bound ipc:// path is gone


def test_a_daemon_unlinks_its_ipc_paths_when_closed(tmp_path: Path) -> None:
    d = Daemon(_cfg(tmp_path), ops=FakeOps())
    assert list((tmp_path / "run").glob("*.sock"))
    d._close()
    assert not list((tmp_path / "run").glob("*.sock"))
    d.resources.close()  # at most once: a second close does nothing


def test_the_metrics_follow_the_loop_and_the_page_is_on_the_control_api(daemon: Daemon) -> None:
    sample = daemon.metrics.registry.get_sample_value
    daemon._on_telemetry(IterationTelemetry(
        incarnation=1, iteration=1, start_s=0.0, end_s=0.01, num_running=4, num_waiting=1,
        decode_tokens=4, prefill_tokens=0, context_tokens=40, kv_blocks_total=9,
        kv_blocks_free=4))
    assert sample("harli_decode_iterations_total") == 1
    assert sample("harli_tpot_measured_seconds") == 0.01
    assert sample("harli_finetune_quota_level") == daemon.quota.level
    daemon._tick(1.0)  # no request in flight: decode is idle
    assert math.isnan(sample("harli_tpot_measured_seconds") or 0.0)

    job = daemon.jobs.store.add(JobSpec(name="j", dataset="/d.jsonl", output_dir="/o/j"), {})
    daemon.metrics.on_micro_step(MicroStepReport(
        job_id=job.job_id, micro_step=1, step=1, epoch=0, tokens=64, step_tokens=64,
        duration_s=0.1, level=2, loss=1.0, paused_s=0, total_steps=9))
    daemon._on_job_ended(JobEnded(job_id=job.job_id, status="failed", error="x",
                                  adapter_path=None))
    assert sample("harli_job_steps", {"job": str(job.job_id)}) == 1
    daemon._tick(daemon.clock() + JOB_SERIES_KEEP_S + 1)
    assert sample("harli_job_steps", {"job": str(job.job_id)}) is None

    page = daemon.control_endpoint.handlers[GetMetrics](GetMetrics())
    assert isinstance(page, MetricsPage)
    assert "harli_decode_iterations_total 1.0" in page.text
