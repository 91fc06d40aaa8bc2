"""The quota policy in the real daemon: the highest level while decode is idle, decode-only
when no level's predicted bound fits the SLO, switched at run time from the control API, SLO
attainment counted from the engine's token times."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest

from harli.bench.local_daemon import LocalDaemon
from harli.client.control import ControlClient
from harli.client.inference import RequestError
from harli.datasets import SAMPLE_DATASET
from harli.ipc.jobs import JobSpec

from .conftest import make_daemon
from .test_finetune import free_port

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]


def _wait_level(c: ControlClient, level: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while c.status().level != level:
        assert time.monotonic() < deadline, f"level never became {level}: {c.status()}"
        time.sleep(0.05)


def test_harli_policy_follows_the_load_and_switches_live(tmp_path: Path,
                                                         tiny_model: Path) -> None:
    # An SLO no iteration can meet: under load the harli policy must pause the finetune.
    with make_daemon(tmp_path / "d", tiny_model, 'scheduler.policy="harli"',
                     "scheduler.tpot_slo_ms=0.5") as d, \
            ControlClient(d.cfg.control_endpoint) as c:
        _wait_level(c, 4)  # idle decode: the highest level
        levels: list[int] = []
        done = threading.Event()

        def watch() -> None:
            with ControlClient(d.cfg.control_endpoint) as w:
                while not done.is_set():
                    levels.append(w.status().level)
                    time.sleep(0.02)

        th = threading.Thread(target=watch)
        th.start()
        with d.client(timeout_s=120) as cl:
            for i in range(3):
                out = cl.complete([5 + i, 6, 7], max_tokens=120, ignore_eos=True)
                assert len(out.token_ids) == 120
        done.set()
        th.join()
        assert 0 in levels  # paused while decoding
        _wait_level(c, 4)  # and back to the highest once idle
        sc = c.status().scheduler
        assert sc is not None and sc.policy == "harli"
        assert sc.tokens >= 3 * 119 and sc.requests == 3
        assert sc.per_token is not None and sc.per_token < 0.5  # 0.5 ms is never met
        assert sc.decision_p99_us is not None and sc.level_changes >= 2

        assert c.set_policy("static:3").level == 3
        assert c.set_policy("decode-only").level == 0
        with pytest.raises(RequestError, match="accepted forms"):
            c.set_policy("fastest")
        assert c.status().scheduler.policy == "decode-only"  # type: ignore[union-attr]
        c.set_policy("harli")
        _wait_level(c, 4)


def _finetune_pid(pids: list[int]) -> int:
    # The children set their process titles: "harli::finetune[N]".
    return next(p for p in pids if Path(f"/proc/{p}/cmdline").read_bytes()
                .startswith(b"harli::finetune"))


def _thread_cores(pid: int) -> set[int]:
    cores: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            cores |= os.sched_getaffinity(int(tid))
    return cores


def _thread_policies(pid: int) -> set[int]:
    policies: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            policies.add(os.sched_getscheduler(int(tid)))
    return policies


def _metric(d: LocalDaemon, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{d.cfg.metrics.port}/metrics",
                                  timeout=10).read().decode()
    return sum(float(line.split(" ")[1]) for line in text.splitlines()
               if line.split(" ")[0] == name)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="one core: decode is not pinned, so there is no core to fence off")
def test_a_level_drop_fences_the_training_finetune_off_decode_cores_at_once(
        tmp_path: Path, tiny_model: Path) -> None:
    with make_daemon(tmp_path / "d", tiny_model, 'scheduler.policy="harli"',
                     "scheduler.tpot_slo_ms=0.5", f"metrics.port={free_port()}") as d, \
            ControlClient(d.cfg.control_endpoint) as c:
        ft = _finetune_pid(d.children())
        decode_core = min(os.sched_getaffinity(0))  # decode.cpu_cores="auto": the first core
        c.attach(JobSpec(name="fence", dataset=str(SAMPLE_DATASET),
                         output_dir=str(tmp_path / "job"), max_seq_len=64, micro_batch_size=4,
                         max_steps=100_000, checkpoint_every=100_000))
        # Idle decode: level 4, and the training finetune spreads onto decode's core.
        deadline = time.monotonic() + 120
        while c.status().level != 4 or decode_core not in _thread_cores(ft):
            assert time.monotonic() < deadline, "the finetune never ran at level 4"
            time.sleep(0.05)
        # Every training thread, torch's OpenMP workers included, is in the idle scheduling
        # class (finetune.cpu_scheduling_policy's default): decode preempts it on its core.
        assert _thread_policies(ft) == {os.SCHED_IDLE}
        fenced: list[bool] = []
        done = threading.Event()

        def load() -> None:
            with d.client(timeout_s=120) as cl:
                cl.complete([5, 6, 7], max_tokens=300, ignore_eos=True)
            done.set()

        th = threading.Thread(target=load)
        th.start()
        while not done.is_set():
            before = c.status().level
            cores = _thread_cores(ft)
            if before == 0 == c.status().level:  # paused for the whole sample
                fenced.append(decode_core not in cores)
            time.sleep(0.01)
        th.join()
        # The daemon moved every thread off decode's core with the drop, and the finetune,
        # mid-micro-step at level 4, did not move back before reading the new decision.
        assert fenced and all(fenced), fenced
        # And it followed the fence inside its chunk: one thread on its one core, not two
        # (block_hooks), counted when that micro-step reports (after the load, once resumed).
        deadline = time.monotonic() + 60
        while _metric(d, "harli_finetune_fence_follows_total") < 1:
            assert time.monotonic() < deadline, "the finetune never followed the fence"
            time.sleep(0.1)
        assert _metric(d, "harli_finetune_cpu_fences_total") >= 1


def test_micro_steps_beside_a_busy_decode_give_the_level_its_measured_rate(
        tmp_path: Path, tiny_model: Path) -> None:
    # The rate path end to end: the finetune's MicroStepReports (with their duty-cycle idle),
    # the daemon's busy/level attribution, and the rate in `harli status`.
    with make_daemon(tmp_path / "d", tiny_model, 'scheduler.policy="static:2"') as d, \
            ControlClient(d.cfg.control_endpoint) as c:
        job = c.attach(JobSpec(name="rates", dataset=str(SAMPLE_DATASET),
                               output_dir=str(tmp_path / "job"), max_seq_len=64,
                               micro_batch_size=4, max_steps=100_000,
                               checkpoint_every=100_000))
        deadline = time.monotonic() + 120
        while c.show(job.job_id).job.tokens == 0:  # training, model loaded
            assert time.monotonic() < deadline, "the job never trained"
            time.sleep(0.1)
        sc = c.status().scheduler
        assert sc is not None and sc.busy_rates_tok_s == {}  # decode idle so far
        with d.client(timeout_s=120) as cl:
            cl.complete([5, 6, 7], max_tokens=600, ignore_eos=True)
        sc = c.status().scheduler
        assert sc is not None
        assert set(sc.busy_rates_tok_s) == {2}, sc.busy_rates_tok_s  # only the level in force
        assert sc.busy_rates_tok_s[2] > 0
        c.cancel(job.job_id)
