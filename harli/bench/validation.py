"""``harli bench-validation``: how fast a real daemon refuses a large dataset with a bad last
line, what that costs its memory and its clients, and how fast it stops mid-validation.

One daemon on the tiny model (decode and the finetune running, as a host runs them). For each
size (default 50 MB, 300 MB and 1 GiB, the default ``finetune.max_dataset_bytes``), a JSONL file
of long alpaca records (so a gigabyte stays under ``max_dataset_records``) whose last line is
bad is attached through the control API, and measured from the attach's reply to the job's
``failed`` status: seconds, MB/s, the daemon's peak RSS growth over its RSS before the attach,
and the validation worker's peak RSS. While each validation runs, a control request
(``GetStatus``) and a short greedy generation are timed, and the same requests are timed on
the idle daemon right before it, so the delay a validation causes its neighbours is measured
in the same run. Then all the sizes at once, side by side. Then decode's TPOT (the engine's
token times) and a control round trip, with two checks of a valid file of the largest size
running side by side against nothing, in interleaved 4-s windows, as per-round ratios. Last, a
valid file of the largest size is attached, the daemon gets SIGTERM once the file is being
tokenized, and the time to its exit is measured; a restart finds the job still
``validating_files`` and checks it again.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from harli.bench.local_daemon import LocalDaemon

DEFAULT_SIZES_MB = (50, 300, 1024)
_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_POLL_S = 0.02


def _record(i: int) -> bytes:
    """An alpaca record of about 1.1 KB: a long run of number words and their digits."""
    digits = [(i * 7 + k * 3) % 10 for k in range(150)]
    return json.dumps({"instruction": "Write these numbers as digits.",
                       "input": " ".join(_WORDS[d] for d in digits),
                       "output": " ".join(str(d) for d in digits)}).encode() + b"\n"


def make_file(path: Path, size_bytes: int, bad_last_line: bool) -> Path:
    """A JSONL file of ``size_bytes`` (or just under), its last line bad when asked."""
    bad = b'{"instruction": "Write these numbers as digits.", "output": 5}\n'
    records = [_record(i) for i in range(64)]
    budget = size_bytes - (len(bad) if bad_last_line else 0)
    with path.open("wb") as f:
        written = 0
        i = 0
        while written + len(records[i % 64]) <= budget:
            written += f.write(records[i % 64])
            i += 1
        if bad_last_line:
            f.write(bad)
    return path


class _Sampler:
    """The peak RSS of the daemon and of its new descendants (validation workers), sampled
    until stopped."""

    def __init__(self, daemon_pid: int, known: set[int]) -> None:
        import psutil

        self._proc = psutil.Process(daemon_pid)
        self.known = known
        self.base_rss = self._proc.memory_info().rss
        self.daemon_peak = self.base_rss
        self.worker_peak = 0
        self.worker_peak_uss = 0  # its own pages, not those shared with the fork server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.daemon_peak = max(self.daemon_peak, self._proc.memory_info().rss)
                for child in self._proc.children(recursive=True):
                    if child.pid not in self.known:
                        mem = child.memory_full_info()
                        self.worker_peak = max(self.worker_peak, mem.rss)
                        self.worker_peak_uss = max(self.worker_peak_uss, mem.uss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"daemon_rss_growth_mb": (self.daemon_peak - self.base_rss) / 1e6,
                "worker_peak_rss_mb": self.worker_peak / 1e6,
                "worker_peak_uss_mb": self.worker_peak_uss / 1e6}


def _neighbours(d: LocalDaemon, until: threading.Event) -> dict[str, list[float]]:
    """Control round trips and greedy 16-token generations, timed until ``until`` is set."""
    from harli.client.control import ControlClient

    out: dict[str, list[float]] = {"control_ms": [], "generate_ms": [], "tpot_ms": []}
    with ControlClient(d.cfg.control_endpoint) as c, d.client() as gen:
        while not until.is_set():
            t = time.perf_counter()
            c.status()
            out["control_ms"].append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            times = [s for chunk in gen.generate("The river ran", max_tokens=16,
                                                 temperature=0.0, ignore_eos=True)
                     for s in chunk.token_times_s]
            out["generate_ms"].append((time.perf_counter() - t) * 1e3)
            # Decode's own pace: the engine's token times, whatever the client's scheduling.
            out["tpot_ms"].extend((b - a) * 1e3 for a, b in itertools.pairwise(times))
            time.sleep(0.05)
    return out


def _p50(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _timed(d: LocalDaemon, seconds: float) -> dict[str, list[float]]:
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    try:
        return _neighbours(d, stop)
    finally:
        timer.cancel()


def _refusals(d: LocalDaemon, files: list[Path], name: str) -> list[dict[str, Any]]:
    """Attach ``files`` at once; per file, the time from its attach's reply to ``failed``."""
    from harli.client.control import ControlClient
    from harli.ipc.jobs import JobSpec

    assert d.proc is not None
    sampler = _Sampler(d.proc.pid, set(d.children()))
    stop = threading.Event()
    neighbours: dict[str, list[float]] = {}
    side = threading.Thread(target=lambda: neighbours.update(_neighbours(d, stop)), daemon=True)
    results: list[dict[str, Any]] = []
    with ControlClient(d.cfg.control_endpoint) as c:
        started: dict[int, tuple[Path, float]] = {}
        for i, f in enumerate(files):
            t = time.monotonic()
            job = c.attach(JobSpec(name=f"{name}-{i}", dataset=str(f)))
            reply_s = time.monotonic() - t
            started[job.job_id] = (f, time.monotonic())
            results.append({"file": f.name, "size_mb": f.stat().st_size / 1e6,
                            "attach_reply_ms": reply_s * 1e3, "job_id": job.job_id})
        side.start()
        pending = dict(started)
        while pending:
            for job_id, (_, since) in list(pending.items()):
                job = c.show(job_id).job
                if job.status != "validating_files":
                    r = next(r for r in results if r["job_id"] == job_id)
                    took = time.monotonic() - since
                    r.update(status=job.status, seconds=took, mb_per_s=r["size_mb"] / took,
                             error=job.error)
                    del pending[job_id]
            time.sleep(_POLL_S)
        stop.set()
        side.join()
    mem = sampler.stop()
    for r in results:
        r.update(mem)
        r.update({f"busy_{k}_p50": _p50(v) for k, v in neighbours.items()})
        r.update({f"busy_{k}_n": len(v) for k, v in neighbours.items()})
    return results


def _sigterm_during_tokenizing(d: LocalDaemon, f: Path, busy_s: float) -> dict[str, Any]:
    """A valid file attached; its neighbours timed for ``busy_s`` while it is tokenized; then
    SIGTERM, and the time to the daemon's exit."""
    from harli.client.control import ControlClient
    from harli.ipc.jobs import JobSpec

    assert d.proc is not None
    with ControlClient(d.cfg.control_endpoint) as c:
        job = c.attach(JobSpec(name="stopped-mid-check", dataset=str(f)))
        while True:
            v = c.show(job.job_id).job.validation
            if v is not None and v.stage == "tokenizing" and v.bytes_done > 0:
                break
            time.sleep(_POLL_S)
        busy = _timed(d, busy_s)
        v = c.show(job.job_id).job.validation
        assert v is not None
    t = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(timeout=120)
    exit_s = time.monotonic() - t
    return {"job_id": job.job_id, "validated_bytes_at_sigterm": v.bytes_done,
            "sigterm_to_exit_s": exit_s, "exit_code": rc,
            "tokenizing": {f"{k}_p50": _p50(v) for k, v in busy.items()},
            "tokenizing_n": len(busy["generate_ms"])}


def _interleaved(d: LocalDaemon, f: Path, rounds: int, window_s: float) -> dict[str, Any]:
    """Decode's TPOT and a control round trip with nothing beside them, then with two checks
    of ``f`` running side by side, window after window: per round the ratio busy / idle."""
    from harli.client.control import ControlClient
    from harli.ipc.jobs import JobSpec

    out: dict[str, Any] = {"rounds": []}
    with ControlClient(d.cfg.control_endpoint) as c:
        for r in range(rounds):
            idle = _timed(d, window_s)
            jobs = [c.attach(JobSpec(name=f"beside-{r}-{k}", dataset=str(f))) for k in range(2)]
            busy = _timed(d, window_s)
            stages = [c.show(j.job_id).job.validation for j in jobs]
            for j in jobs:
                c.cancel(j.job_id)
            out["rounds"].append({
                "idle_tpot_ms": _p50(idle["tpot_ms"]), "busy_tpot_ms": _p50(busy["tpot_ms"]),
                "idle_control_ms": _p50(idle["control_ms"]),
                "busy_control_ms": _p50(busy["control_ms"]),
                "stages_at_end": [v.stage if v is not None else None for v in stages]})
    for key in ("tpot", "control"):
        ratios = [x[f"busy_{key}_ms"] / x[f"idle_{key}_ms"] for x in out["rounds"]
                  if x[f"busy_{key}_ms"] and x[f"idle_{key}_ms"]]
        out[f"{key}_ratio_median"] = statistics.median(ratios) if ratios else None
        out[f"{key}_ratio_range"] = [min(ratios), max(ratios)] if ratios else None
    return out


def run_bench(base: Path, sizes_mb: tuple[int, ...] = DEFAULT_SIZES_MB) -> dict[str, Any]:
    base.mkdir(parents=True, exist_ok=True)
    data = base / "data"
    data.mkdir(exist_ok=True)
    limit = 1 << 30
    files = [make_file(data / f"bad-{mb}mb.jsonl", _bytes(mb), True) for mb in sizes_mb]
    overrides = ['scheduler.policy="static:2"', f"finetune.max_dataset_bytes={limit}"]
    daemon = LocalDaemon(base / "daemon", overrides)
    res: dict[str, Any] = {"sizes_mb": list(sizes_mb), "cpus": os.cpu_count()}
    with daemon:
        idle = _timed(daemon, 10.0)
        res["idle"] = {f"{k}_p50": _p50(v) for k, v in idle.items()}
        res["idle_n"] = len(idle["generate_ms"])
        res["one_at_a_time"] = [_refusals(daemon, [f], f"one{i}")[0]
                                for i, f in enumerate(files)]
        res["side_by_side"] = _refusals(daemon, files, "all")
        valid = make_file(data / "valid.jsonl", _bytes(max(sizes_mb)), False)
        res["interleaved"] = _interleaved(daemon, valid, rounds=4, window_s=4.0)
        res["sigterm"] = _sigterm_during_tokenizing(daemon, valid, 10.0)
    again = LocalDaemon(base / "daemon", overrides)
    with again:
        from harli.client.control import ControlClient

        with ControlClient(again.cfg.control_endpoint) as c:
            job = c.show(res["sigterm"]["job_id"])
            res["sigterm"]["status_after_restart"] = job.job.status
            res["sigterm"]["events_after_restart"] = [e.message for e in job.events[-3:]]
            c.cancel(job.job.job_id)
    return res


def print_table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    idle = res["idle"]
    for title, rows in (("one at a time", res["one_at_a_time"]),
                        ("side by side", res["side_by_side"])):
        t = Table(title=f"a bad last line, {title} (idle: control {idle['control_ms_p50']:.1f} "
                        f"ms, 16-token generate {idle['generate_ms_p50']:.0f} ms, TPOT "
                        f"{idle['tpot_ms_p50']:.2f} ms, p50)")
        for col in ("file", "MB", "reply ms", "to refusal s", "MB/s", "daemon RSS +MB",
                    "worker RSS (own) MB", "control ms", "generate ms", "TPOT ms"):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(r["file"], f"{r['size_mb']:.0f}", f"{r['attach_reply_ms']:.0f}",
                      f"{r['seconds']:.2f}", f"{r['mb_per_s']:.0f}",
                      f"{r['daemon_rss_growth_mb']:.1f}",
                      f"{r['worker_peak_rss_mb']:.0f} ({r['worker_peak_uss_mb']:.0f})",
                      _fmt(r.get("busy_control_ms_p50"), ".1f"),
                      _fmt(r.get("busy_generate_ms_p50"), ".0f"),
                      _fmt(r.get("busy_tpot_ms_p50"), ".2f"))
        Console().print(t)
    il = res["interleaved"]
    print(f"two checks of a {max(res['sizes_mb'])} MB file side by side against none, "
          f"{len(il['rounds'])} interleaved rounds of 4 s: decode's TPOT p50 x"
          f"{il['tpot_ratio_median']:.3f} ({il['tpot_ratio_range'][0]:.3f}-"
          f"{il['tpot_ratio_range'][1]:.3f}), control round trip p50 x"
          f"{il['control_ratio_median']:.2f} ({il['control_ratio_range'][0]:.2f}-"
          f"{il['control_ratio_range'][1]:.2f})")
    s = res["sigterm"]
    busy = s["tokenizing"]
    print(f"while a {max(res['sizes_mb'])} MB file is tokenized: control "
          f"{busy['control_ms_p50']:.1f} ms, 16-token generate {busy['generate_ms_p50']:.0f} ms, "
          f"TPOT {busy['tpot_ms_p50']:.2f} ms (p50 of {s['tokenizing_n']} generations; idle: "
          f"{idle['control_ms_p50']:.1f} ms, {idle['generate_ms_p50']:.0f} ms, "
          f"{idle['tpot_ms_p50']:.2f} ms, p50 of {res['idle_n']})")
    print(f"SIGTERM while tokenizing it ({s['validated_bytes_at_sigterm'] / 1e6:.0f} MB in): "
          f"exit {s['exit_code']} after {s['sigterm_to_exit_s']:.1f} s; after a restart the job "
          f"is {s['status_after_restart']}: {' / '.join(s['events_after_restart'])}")
    for r in res["one_at_a_time"] + res["side_by_side"]:
        if r["status"] != "failed" or not r["error"] or ":" not in r["error"]:
            print(f"unexpected outcome for {r['file']}: {r['status']} {r['error']}")


def _bytes(mb: int) -> int:
    """``mb`` megabytes, 1024 meaning 1 GiB (the default limit, which no file may pass)."""
    return 1 << 30 if mb >= 1024 else mb * 1_000_000


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)
