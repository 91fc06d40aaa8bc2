"""Process-level operations of the real daemon: one daemon per dirs, socket modes, a bad
model directory refused before any child starts."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harli.bench.local_daemon import LocalDaemon

from .conftest import make_daemon


def test_second_daemon_on_same_dirs_exits_and_first_still_serves(tmp_path: Path,
                                                                  tiny_model: Path) -> None:
    first = make_daemon(tmp_path, tiny_model)
    with first:
        assert first.proc is not None
        second = subprocess.run(_daemon_argv(first), capture_output=True, text=True,
                                timeout=120, check=False)
        out = second.stdout + second.stderr
        assert second.returncode != 0, out
        assert f"already running (pid {first.proc.pid})" in out, out
        assert "Traceback" not in out, out
        # The first daemon's sockets are still there and it still answers.
        run_dir = first.cfg.runtime_dir
        assert any(run_dir.iterdir())
        with first.client(timeout_s=60.0) as c:
            assert c.hello().ready
            done = c.complete([5, 6, 7, 8], max_tokens=4, temperature=0.0, ignore_eos=True)
            assert len(done.token_ids) == 4


def test_sockets_are_group_writable_and_the_cli_finds_them_and_never_shows_a_traceback(
        tmp_path: Path, tiny_model: Path) -> None:
    d = make_daemon(tmp_path, tiny_model)
    with d:
        for ep in (d.cfg.inference_endpoint, d.cfg.control_endpoint):
            assert ep.startswith("ipc://")
            mode = stat.S_IMODE(Path(ep[len("ipc://"):]).stat().st_mode)
            assert mode == 0o660, oct(mode)
        env = {**os.environ, "HARLI_RUNTIME_DIR": str(d.cfg.runtime_dir)}

        def harli(*argv: str, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "harli.cli.main", *argv],
                                  stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
                                  timeout=120, check=False)

        # Found through $HARLI_RUNTIME_DIR alone, as an operator's shell finds the service.
        ok = harli("status", "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["pid"] == d.proc.pid  # type: ignore[union-attr]
        # The daemon's refusals are one line and exit 1.
        for argv, words in ((["policy", "fast"], "fast"), (["level", "9"], "9"),
                            (["job", "show", "424242"], "424242")):
            r = harli(*argv)
            assert r.returncode == 1, (argv, r.stderr)
            assert "Traceback" not in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert words in r.stderr, r.stderr
        # A reader that went away (`harli status | head -1`) is not an error.
        for argv in (["status"], ["status", "--json"]):  # rich's console, and print()
            read_end, write_end = os.pipe()
            os.close(read_end)
            try:
                r = harli(*argv, stdout=write_end)
            finally:
                os.close(write_end)
            assert r.returncode == 1, (argv, r.stderr)  # as rich and Python's docs do
            assert not r.stderr, argv  # silent, as `yes | head -1` is


def _daemon_argv(d: LocalDaemon) -> list[str]:
    argv = [sys.executable, "-m", "harli.cli.main", "daemon"]
    for o in d.overrides:
        argv += ["--set", o]
    return argv


@pytest.mark.parametrize("make_dir", [False, True], ids=["missing", "empty"])
def test_a_bad_model_path_is_one_line_and_exit_2(tmp_path: Path, make_dir: bool) -> None:
    model = tmp_path / "no-model"
    if make_dir:
        model.mkdir()
    d = make_daemon(tmp_path, model)
    t0 = time.monotonic()
    res = subprocess.run(_daemon_argv(d), capture_output=True, text=True, timeout=120,
                         check=False)
    took = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "model.path" in out and str(model) in out, out
    assert "Traceback" not in out, out
    assert len([x for x in out.splitlines() if "cannot start" in x]) == 1, out
    assert took < 60, took  # no child was started: nothing to crash through back-off


def test_hostile_datasets_fail_at_once_and_sigterm_stops_a_validation_in_progress(
        tmp_path: Path, tiny_model: Path) -> None:
    from harli.client.control import ControlClient
    from harli.datasets import SAMPLE_DATASET
    from harli.ipc.jobs import JobSpec

    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    # Large enough that tokenizing it takes the tiny model's tokenizer well over a minute here.
    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": "one two three four five six seven eight nine ten " * 8})
    big.write_text((line + "\n") * 200_000)
    d = make_daemon(tmp_path / "d", tiny_model)
    with d, ControlClient(d.cfg.control_endpoint, timeout_s=60) as ctl:
        for hostile in (str(fifo), "/dev/zero"):
            job = ctl.attach(JobSpec(name=f"h{len(hostile)}", dataset=hostile))
            done = ctl.wait_validated(job.job_id)
            assert done.status == "failed" and "not a regular file" in (done.error or "")
        after = ctl.attach(JobSpec(name="after", dataset=str(SAMPLE_DATASET), max_steps=1))
        assert ctl.wait_validated(after.job_id).status != "failed"
        rss_before = _rss_bytes(d.proc.pid)  # type: ignore[union-attr]
        slow = ctl.attach(JobSpec(name="big", dataset=str(big)))
        deadline = time.monotonic() + 60
        while True:  # being tokenized (in a worker) when SIGTERM comes
            v = ctl.show(slow.job_id).job.validation
            if v is not None and v.stage == "tokenizing" and v.bytes_done:
                break
            assert time.monotonic() < deadline, "the big file's check never got to tokenizing"
            time.sleep(0.05)
        # The file is read by the worker: the daemon's own memory does not follow its size.
        assert _rss_bytes(d.proc.pid) < rss_before + 50 * 2**20  # type: ignore[union-attr]
        t0 = time.monotonic()
        rc = d.stop(timeout_s=60)
        stop_s = time.monotonic() - t0
    assert rc == 0, d.log_tail()  # exited by itself on SIGTERM, not killed after 60 s
    assert stop_s < 30
    # The job it was checking is kept, and checked again from the start.
    again = make_daemon(tmp_path / "d", tiny_model)
    with again, ControlClient(again.cfg.control_endpoint, timeout_s=60) as ctl:
        kept = ctl.show(slow.job_id)
        assert kept.job.status == "validating_files"
        assert any("checking them again" in e.message for e in kept.events)
        assert ctl.cancel(slow.job_id).status == "cancelled"


def _rss_bytes(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def test_a_setting_vllm_refuses_is_fatal_at_once_in_one_line(tmp_path: Path,
                                                             tiny_model: Path) -> None:
    # The tiny model has 2048 positions; vLLM refuses a longer max_model_len at engine start.
    d = make_daemon(tmp_path, tiny_model, "model.max_model_len=100000", "metrics.port=0")
    res = subprocess.run(_daemon_argv(d), capture_output=True, text=True, timeout=240,
                         check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "vLLM refused the decode configuration" in out and "100000" in out, out
    assert "failed on its configuration (exit code 78); not restarting it (FATAL)" in out, out
    assert "decode[2]" not in out, out  # started once: no back-off through restarts
    assert "Traceback" not in out, out
