"""Faults on the finetune side: finetune_proc SIGKILLed mid-step, the daemon SIGKILLed and
restarted. Jobs resume from their last checkpoint; no step is lost past it or counted twice;
decode requests in flight are not affected."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from harli.bench.local_daemon import pid_alive
from harli.client.control import ControlClient
from harli.daemon.jobstore import JobStore

from .conftest import make_daemon
from .test_finetune import spec, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]


def _child(daemon_pid: int, module: str) -> int:
    for p in psutil.Process(daemon_pid).children():
        if module in " ".join(p.cmdline()):
            return p.pid
    raise AssertionError(f"no {module} child")


def test_kill_finetune_mid_step_resumes_from_checkpoint(tmp_path: Path,
                                                        tiny_model: Path) -> None:
    with make_daemon(tmp_path / "d", tiny_model) as d, \
            ControlClient(d.cfg.control_endpoint) as c:
        job = c.attach(spec(tmp_path, "resume", max_steps=60, checkpoint_every=10))
        before = wait_job(c, job.job_id, lambda j: j.step >= 15)
        assert before.checkpoint_step == 10
        result: dict[str, object] = {}

        def stream() -> None:  # a decode request in flight across the kill
            with d.client(timeout_s=60) as cl:
                result["out"] = cl.complete([5, 6, 7], max_tokens=400, ignore_eos=True)

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.3)
        os.kill(_child(d.proc.pid, "harli::finetune"), signal.SIGKILL)  # type: ignore[union-attr]
        steps = []
        while True:
            j = c.show(job.job_id).job
            steps.append(j.step)
            if j.status == "succeeded":
                break
            assert j.status != "failed", j.error
            time.sleep(0.1)
        t.join(60)
        assert len(result["out"].token_ids) == 400  # type: ignore[attr-defined]
        # Never behind the checkpoint; the end counts every step once.
        assert min(steps) >= 10
        assert j.step == 60 and j.micro_steps == 60 and j.restarts == 1
        msgs = [e.message for e in c.logs(job.job_id).events]
        assert any("finetune process died (killed by SIGKILL)" in m for m in msgs), msgs
        assert "resumed from checkpoint-10" in msgs or any(
            "resumed from checkpoint-" in m for m in msgs), msgs
        # The history from before the kill is carried on, the steps redone after it logged
        # once: in the last checkpoint's trainer_state.json and in the metric events.
        state = json.loads((tmp_path / "resume" / "checkpoint-60" / "trainer_state.json")
                           .read_text())
        assert [e["step"] for e in state["log_history"]] == list(range(1, 61))
        assert [m.step for m in c.all_logs(job.job_id).metrics] == list(range(1, 61))


def test_daemon_killed_and_restarted_resumes_the_running_job(tmp_path: Path,
                                                              tiny_model: Path) -> None:
    d = make_daemon(tmp_path / "d", tiny_model)
    with d, ControlClient(d.cfg.control_endpoint) as c:
        job = c.attach(spec(tmp_path, "survivor", max_steps=60, checkpoint_every=10))
        wait_job(c, job.job_id, lambda j: j.step >= 12)
        kids = d.children()
        d.proc.kill()  # type: ignore[union-attr]  # SIGKILL: no chance to clean up
        d.proc.wait()  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in kids) and time.monotonic() < deadline:
            time.sleep(0.1)  # children follow through PR_SET_PDEATHSIG
        assert not any(pid_alive(p) for p in kids)
    store = JobStore(d.cfg.state_dir / "jobs.sqlite")  # intact, and says what it knew
    stored = store.get(job.job_id)
    store.close()
    assert stored is not None and stored.status == "running" and stored.step >= 12
    assert stored.checkpoint_step is not None and stored.checkpoint_step >= 10

    d2 = make_daemon(tmp_path / "d", tiny_model)
    with d2, ControlClient(d2.cfg.control_endpoint) as c:
        done = wait_job(c, job.job_id, lambda j: j.status == "succeeded")
        assert done.step == 60 and done.micro_steps == 60
        msgs = [e.message for e in c.logs(job.job_id).events]
        assert any("daemon restarted" in m for m in msgs)
        assert f"resumed from checkpoint-{stored.checkpoint_step}" in msgs, msgs
