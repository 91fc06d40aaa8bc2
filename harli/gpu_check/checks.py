"""The checks of ``harli gpu-check``: does each GPU mechanism work on this host, and what does
it measure? (``docs/gpu.md``.)

Sections, each recorded as ok / error / skipped with its reason and figures:

- ``mps``: a private MPS control daemon (``harli.daemon.mps.MpsControl``); two clients each
  running a loop of one-SM spin kernels, alone and together, without and with MPS: with MPS
  their kernels overlap (wall time together ~ one alone), without they time-slice (~ the sum).
- ``cuda_ipc``: a ``CudaArena`` exported by one process, attached by another (both MPS clients
  when MPS is up): each sees the other's writes.
- ``green_contexts``: GEMM throughput (TFLOP/s) in each level's green context (``sm_counts``).
- ``stage2_profile``: a plain transformers decode loop's per-iteration latency alone and beside
  a PEFT LoRA trainer in another process at each level (median, p99, ratios to alone).
- ``arena_kv``: a KV-cache-like tensor in a CUDA arena written by one process, read by another.
- ``shared_weights``: the finetune model built on IPC views of a decode model's (fused, vLLM
  style) weights: equal logits, no second copy, base untouched by a LoRA step.

All GPU work runs in ``python -m harli.gpu_check.worker`` processes (JSON lines, no pickle)
started after the MPS daemon, so that every one of them is an MPS client; this process never
initialises CUDA. Without CUDA, ``run_checks`` returns a report whose ``error`` says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

from harli.gpu_check.report import (
    GpuCheckReport,
    Section,
    corun_rows,
    new_report,
    overlap_figures,
)

logger = logging.getLogger(__name__)

SECTIONS = ("mps", "cuda_ipc", "green_contexts", "stage2_profile", "arena_kv",
            "shared_weights")
WORKER_MODULE = "harli.gpu_check.worker"


class WorkerError(RuntimeError):
    """A worker failed, went silent or exited early; the message carries its last words."""


class Worker:
    """One ``gpu_check_worker`` process and its JSON-lines conversation."""

    def __init__(self, role: str, args: dict[str, Any], env: dict[str, str],
                 timeout_s: float) -> None:
        self.role = role
        self.timeout_s = timeout_s
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, role],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=env, text=True)
        self.pid = self.proc.pid
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        self.send_raw(args)

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                self._events.put(msgspec.json.decode(line))
            except msgspec.DecodeError:
                self._events.put({"event": "error", "error": f"not an event: {line[:200]!r}"})
        self._events.put(None)

    def send_raw(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(msgspec.json.encode(obj).decode() + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerError(f"{self.role} worker is gone{self._tail()}") from None

    def send(self, event: str, **fields: Any) -> None:
        self.send_raw({"event": event, **fields})

    def expect(self, event: str, timeout_s: float | None = None) -> dict[str, Any]:
        try:
            msg = self._events.get(timeout=timeout_s or self.timeout_s)
        except queue.Empty:
            raise WorkerError(f"{self.role} worker sent no {event!r} within "
                              f"{timeout_s or self.timeout_s:.0f} s{self._tail()}") from None
        if msg is None:
            self.proc.wait(10)
            raise WorkerError(f"{self.role} worker exited (code {self.proc.returncode}) "
                              f"before {event!r}{self._tail()}")
        if msg.get("event") == "error":
            raise WorkerError(f"{self.role} worker failed: {msg.get('error')}\n"
                              f"{msg.get('traceback', '')}")
        if msg.get("event") != event:
            raise WorkerError(f"{self.role} worker sent {msg.get('event')!r}, expected {event!r}")
        return msg

    def result(self) -> dict[str, Any]:
        msg = self.expect("result")
        self.proc.wait(self.timeout_s)
        return msg

    def _tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return f"; its stderr ends with:\n{text[-2000:]}" if text else ""

    def close(self, before_kill: Callable[[int], None] | None = None) -> None:
        """Kill it if it still runs: after ``terminate_client`` under MPS, because a signal
        that lands on a client with GPU work in flight is undefined behaviour for every client
        of the server (``docs/gpu.md``)."""
        if self.proc.poll() is None:
            if before_kill is not None:
                with contextlib.suppress(Exception):
                    before_kill(self.pid)
            self.proc.kill()
            self.proc.wait(30)
        self._stderr.close()


@dataclass
class CheckOptions:
    out: Path
    sections: tuple[str, ...] = SECTIONS
    levels: int = 4
    model: str = "small"
    quick: bool = False
    mps: str = "start"  # start | off
    timeout_s: float = 600.0


@dataclass
class _Run:
    """State shared by the sections of one gpu-check."""

    opts: CheckOptions
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    mps: Any = None  # MpsControl while a daemon we started is up

    @property
    def on_mps(self) -> bool:
        return self.mps is not None

    def terminate(self, pid: int) -> None:
        if self.mps is not None:
            self.mps.terminate(pid)

    @contextlib.contextmanager
    def workers(self) -> Iterator[list[Worker]]:
        started: list[Worker] = []
        try:
            yield started
        finally:
            for w in started:
                w.close(self.terminate)

    def start(self, started: list[Worker], role: str, **args: Any) -> Worker:
        w = Worker(role, args, self.env, self.opts.timeout_s)
        started.append(w)
        return w

    def run(self, role: str, **args: Any) -> dict[str, Any]:
        with self.workers() as ws:
            return self.start(ws, role, **args).result()


def _section(report: GpuCheckReport, run: _Run, name: str,
             fn: Callable[[_Run], dict[str, Any]]) -> None:
    section = Section(name=name)
    report.sections.append(section)
    if name not in run.opts.sections:
        section.reason = "not selected (--only)"
        return
    t0 = time.monotonic()
    logger.info("[gpu-check] %s ...", name)
    try:
        figures = fn(run)
        skipped = figures.pop("skipped", None)
        section.figures = figures
        section.status = "skipped" if skipped else "ok"
        section.reason = str(skipped or "")
    except Exception as e:
        section.status = "error"
        section.reason = str(e)
        logger.error("[gpu-check] %s failed: %s", name, e)
    section.seconds = time.monotonic() - t0
    logger.info("[gpu-check] %s: %s (%.1f s)", name, section.status, section.seconds)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _busy_args(run: _Run) -> dict[str, Any]:
    return {"kernel_ms": 10.0, "kernels": 50 if run.opts.quick else 150}


def _busy(run: _Run, clients: int) -> tuple[list[tuple[float, float]], dict[str, Any]]:
    """``clients`` spin-kernel loops started together: their (start, end), and, under MPS, what
    the control daemon lists while they are ready (servers, and which of them are clients)."""
    with run.workers() as ws:
        for _ in range(clients):
            run.start(ws, "busy", **_busy_args(run))
        for w in ws:
            w.expect("ready")
        listed: dict[str, Any] = {}
        if run.mps is not None:
            servers = run.mps.server_pids()
            pids = {p for s in servers for p in run.mps.client_pids(s)}
            listed = {"servers": servers,
                      "workers_listed_as_clients": sum(w.pid in pids for w in ws)}
        for w in ws:
            w.send("go")
        results = [w.result() for w in ws]
        return [(float(r["start_s"]), float(r["end_s"])) for r in results], listed


def check_mps(run: _Run) -> dict[str, Any]:
    from harli.daemon.mps import MpsControl, MpsError

    solo = _busy(run, 1)[0][0]
    solo_s = solo[1] - solo[0]
    figures: dict[str, Any] = {"kernel_ms": 10.0, "kernels": _busy_args(run)["kernels"]}
    figures["without_mps"] = overlap_figures(solo_s, _busy(run, 2)[0])
    if run.opts.mps == "off":
        figures["skipped"] = "--mps off"
        return figures
    root = Path(tempfile.mkdtemp(prefix="harli-mps-"))  # short: MPS keeps sockets there
    mps = MpsControl("start", root / "pipe", root / "log")
    try:
        mps.start()
    except MpsError as e:
        raise WorkerError(f"MPS did not start: {e}") from None
    run.mps = mps
    run.env = mps.client_env(os.environ, "decode")
    spans, listed = _busy(run, 2)
    figures["with_mps"] = overlap_figures(solo_s, spans)
    figures["with_mps"]["overlapped"] = figures["with_mps"]["overlap"] > 1.5
    figures.update(listed, pipe_dir=str(mps.pipe_dir))
    if not listed.get("servers"):
        # Servers start at the first client's connection: none means the workers ran
        # without MPS (pipe directory not seen, or another user's server).
        raise WorkerError(f"the MPS control daemon started but no server came up for the "
                          f"busy workers; figures: {figures}")
    if listed.get("workers_listed_as_clients", 0) < 2:
        # MPS lists host-namespace PIDs; in a container they differ from ours.
        figures["note"] = ("the server does not list the workers' PIDs as clients (another "
                           "PID namespace?); the overlap figure is the evidence")
    return figures


def check_cuda_ipc(run: _Run) -> dict[str, Any]:
    with run.workers() as ws:
        owner = run.start(ws, "ipc-owner")
        handle = owner.expect("handle")["handle"]
        peer = run.run("ipc-peer", handle=handle)
        owner.send("check")
        mine = owner.result()
    figures = {"mps": run.on_mps, **{k: v for k, v in mine.items() if k != "event"},
               **{k: v for k, v in peer.items() if k != "event"}}
    bad = [k for k in ("peer_write_seen", "owner_write_seen", "untouched_page_zero",
                       "same_process_attach") if not figures.get(k)]
    if bad:
        raise WorkerError(f"CUDA IPC check failed: {', '.join(bad)}; figures: {figures}")
    return figures


def check_green_contexts(run: _Run) -> dict[str, Any]:
    r = run.run("gemm", levels=run.opts.levels, n=4096 if run.opts.quick else 8192,
                iters=10 if run.opts.quick else 20)
    r.pop("event", None)
    r["mps"] = run.on_mps
    if not r.get("skipped"):
        bad = [row["level"] for row in r["rows"] if not row["finite"]]
        if bad:
            raise WorkerError(f"GEMM gave non-finite values at levels {bad} (cuBLAS under a "
                              f"partition, docs/gpu.md); figures: {r}")
    return r


def check_stage2(run: _Run) -> dict[str, Any]:
    quick = run.opts.quick
    model = "tiny" if quick else run.opts.model
    decode_args = {"model": model, "batch": 16, "prompt_len": 128 if quick else 256,
                   "iters": 60 if quick else 200, "warmup": 10 if quick else 20}
    train_args = {"model": model, "levels": run.opts.levels, "batch": 4 if quick else 8,
                  "seq": 256 if quick else 512}
    alone = run.run("decode", **decode_args)["summary"]
    by_level: dict[int, dict[str, float]] = {}
    trainer: dict[str, Any] = {}
    for level in range(1, run.opts.levels + 1):
        with run.workers() as ws:
            t = run.start(ws, "train", level=level, **train_args)
            quota = t.expect("ready")["quota"]
            by_level[level] = run.run("decode", **decode_args)["summary"]
            t.send("stop")
            tr = t.result()
        trainer[str(level)] = {"steps_per_s": tr["steps_per_s"],
                               "tokens_per_s": tr["tokens_per_s"], "quota": quota}
    return {"mps": run.on_mps, "model": model, "decode": decode_args, "train": train_args,
            "alone": alone, "levels": corun_rows(alone, by_level), "trainer": trainer}


def check_arena_kv(run: _Run) -> dict[str, Any]:
    with run.workers() as ws:
        owner = run.start(ws, "kv-owner")
        h = owner.expect("handle")
        reader = run.run("kv-reader", handle=h["handle"], shape=h["shape"])
        owner.send("check")
        mine = owner.result()
    figures = {"mps": run.on_mps, "shape": h["shape"], "kv_bytes": mine["kv_bytes"],
               "owner_kv_seen": reader["owner_kv_seen"],
               "lent_block_written_by_reader": mine["lent_block_written_by_reader"],
               "other_blocks_unchanged": mine["other_blocks_unchanged"]}
    bad = [k for k in ("owner_kv_seen", "lent_block_written_by_reader",
                       "other_blocks_unchanged") if not figures[k]]
    if bad:
        raise WorkerError(f"arena KV check failed: {', '.join(bad)}")
    return figures


def check_shared_weights(run: _Run) -> dict[str, Any]:
    model = "tiny" if run.opts.quick else run.opts.model
    with run.workers() as ws:
        owner = run.start(ws, "weights-owner", model=model)
        ex = owner.expect("exports")
        reader = run.run("weights-reader", model=model, exports=ex["exports"],
                         input_ids=ex["input_ids"], logits=ex["logits"])
        owner.send("done")
        mine = owner.result()
    figures = {"mps": run.on_mps, "model": model,
               **{k: v for k, v in mine.items() if k != "event"},
               **{k: v for k, v in reader.items() if k != "event"}}
    bad = [k for k in ("same_process_views_equal", "params_inside_shared",
                       "base_unchanged_after_lora_step") if not figures[k]]
    if figures["max_abs_diff"] > 1e-3:
        bad.append(f"max_abs_diff {figures['max_abs_diff']:.3g}")
    if bad:
        raise WorkerError(f"shared-weights check failed: {', '.join(bad)}; figures: {figures}")
    return figures


CHECKS: tuple[tuple[str, Callable[[_Run], dict[str, Any]]], ...] = (
    ("mps", check_mps), ("cuda_ipc", check_cuda_ipc), ("green_contexts", check_green_contexts),
    ("stage2_profile", check_stage2), ("arena_kv", check_arena_kv),
    ("shared_weights", check_shared_weights))


def run_checks(opts: CheckOptions) -> GpuCheckReport:
    report = new_report()
    run = _Run(opts)
    try:
        report.host = run.run("probe")
        report.host.pop("event", None)
    except WorkerError as e:
        report.error = f"the probe process failed: {e}"
        return report.finish()
    if not report.host.get("cuda_available"):
        report.error = (f"CUDA is not available here (torch {report.host.get('torch')}, built "
                        f"for CUDA {report.host.get('torch_cuda')}): run harli gpu-check on a "
                        f"GPU host with a CUDA build of torch")
        return report.finish()
    if "mps" not in opts.sections and opts.mps == "start":
        logger.info("[gpu-check] MPS is started only by the mps section; the others run "
                    "without it")
    try:
        for name, fn in CHECKS:
            _section(report, run, name, fn)
    finally:
        if run.mps is not None:
            run.mps.stop()
    return report.finish()
