"""``harli demo`` (``make run``): the real daemon on the tiny model. First a few streaming
requests served side by side, with their timings; then the sample LoRA job attached while the
same requests keep streaming, its progress beside them, and what the adapter learned; then the
adapter asked through the running daemon, no restart, against the base model in the same
batches.

It ends with the bench in short form: every quota policy against one changing load.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from harli.cli.command import Command, CommandError
from harli.datasets import SAMPLE_DATASET

PROMPTS = [
    "The river ran past the old mill",
    "A decode instance of a large language model",
    "Martha kept the bakery on the corner",
    "def fibonacci(n: int) -> int:",
    "In winter the river froze at its edges",
    "The scheduler reads telemetry after every iteration",
]


async def _stream_all(endpoint: str, max_tokens: int, view: dict[str, Any],
                      refresh: Any) -> list[Any]:
    from harli.client.inference import AsyncInferenceClient, Completion

    async with AsyncInferenceClient(endpoint, timeout_s=120) as client:
        async def one(i: int, prompt: str) -> Completion:
            out = Completion(request_id=f"demo-{i}", sent_s=time.time())
            view[prompt] = out
            async for chunk in client.generate(prompt, request_id=out.request_id,
                                               max_tokens=max_tokens, temperature=0.8,
                                               seed=i, ignore_eos=True):
                out.add(chunk, time.time())
                refresh()
            return out

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))


def _live_table(view: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title="streaming through the daemon", expand=True)
    t.add_column("prompt", ratio=2)
    t.add_column("tokens", justify="right")
    t.add_column("generated text (tiny random model: noise is expected)", ratio=3)
    for prompt, c in view.items():
        t.add_row(prompt, str(len(c.token_ids)), repr(c.text[-60:]))
    return t


def _summary(outs: list[Any]) -> Any:
    from rich.table import Table

    t = Table(title="what came back")
    for col in ("request", "prompt tok", "output tok", "TTFT ms", "TPOT ms", "tok/s",
                "finish"):
        t.add_column(col, justify="right")
    for c in outs:
        span = c.recv_times_s[-1] - c.sent_s
        t.add_row(c.request_id, str(c.num_prompt_tokens), str(len(c.token_ids)),
                  f"{1e3 * c.ttft_s:.1f}", f"{1e3 * (c.tpot_s or 0):.2f}",
                  f"{len(c.token_ids) / span:.0f}", str(c.finish_reason))
    return t


def _finetune_phase(console: Any, daemon: Any, args: argparse.Namespace) -> None:
    from rich.live import Live
    from rich.table import Table

    from harli.client.control import ControlClient
    from harli.finetune_proc.evaluate import evaluate_adapter
    from harli.ipc.jobs import JobSpec

    dataset = SAMPLE_DATASET
    name = f"demo-digits-{time.strftime('%Y%m%d-%H%M%S')}"
    spec = JobSpec(name=name, dataset=str(dataset),
                   max_seq_len=128,
                   micro_batch_size=8, learning_rate=5e-3, lr_schedule="constant",
                   max_steps=args.steps, checkpoint_every=50)
    console.rule("[bold]a LoRA job beside the decode traffic")
    with ControlClient(daemon.cfg.control_endpoint) as ctl:
        job = ctl.wait_validated(ctl.attach(spec).job_id)
        if job.status == "failed":
            raise CommandError(f"the demo's job failed the check of its files: {job.error}")
        report = job.dataset_report or {}
        console.print(f"harli attach {dataset.name}: job {job.job_id} ({report.get('records')} "
                      f"{report.get('format')} records: number words -> digits), "
                      f"{args.steps} steps; quota policy {daemon.cfg.scheduler.policy}, "
                      f"TPOT SLO {daemon.cfg.scheduler.tpot_slo_ms:.0f} ms")
        rounds: list[float] = []
        peak_lent = [0]

        def view() -> Table:
            j = ctl.show(job.job_id).job
            m = ctl.status().memory
            lent = m.pages.get("finetune", 0) if m else 0
            peak_lent[0] = max(peak_lent[0], lent)
            t = Table(expand=True)
            for col in ("job", "status", "step", "loss (first -> now)", "train tok/s",
                        "decode rounds", "decode TPOT ms (last round)", "KV pages lent"):
                t.add_column(col)
            t.add_row(str(j.job_id), j.status, f"{j.step}/{j.total_steps or '?'}",
                      f"{j.first_loss or 0:.2f} -> {j.loss or 0:.2f}",
                      f"{j.tokens_per_s or 0:.0f}", str(len(rounds)),
                      f"{1e3 * rounds[-1]:.2f}" if rounds else "-",
                      f"{lent}/{sum(m.pages.values())}" if m else "arena off")
            return t

        with Live(view(), console=console, refresh_per_second=4) as live:
            while True:
                outs = asyncio.run(_stream_all(daemon.endpoint, args.max_tokens, {},
                                               lambda: None))
                rounds.append(statistics.median(c.tpot_s for c in outs if c.tpot_s))
                live.update(view())
                j = ctl.show(job.job_id).job
                if j.status in ("succeeded", "failed", "cancelled"):
                    break
        console.print(f"decode kept serving: {len(rounds)} rounds of {len(PROMPTS)} streams "
                      f"during training, median TPOT {1e3 * statistics.median(rounds):.2f} ms")
        m = ctl.status().memory
        if m is not None:
            saved = m.saved_lease_bytes + m.saved_private_bytes
            console.print(
                f"memory pool: up to {peak_lent[0]} of {sum(m.pages.values())} arena pages "
                f"({peak_lent[0] * m.page_bytes / 2**20:.0f} MiB of idle KV cache) lent to the "
                f"finetune; {m.saved_lease_bytes / saved if saved else 0:.1%} of the "
                f"{saved / 2**30:.1f} GiB autograd saved went there; reclaims "
                f"{sum(m.reclaims.values())}, vLLM preemptions {m.preemptions}")
        if j.status != "succeeded" or not j.adapter_path:
            console.print(f"[red]job {j.status}: {j.error}")
            return
        ev = evaluate_adapter(daemon.cfg.model_path, j.adapter_path, dataset, 128)
        console.print(f"job {j.job_id} {j.status} in {j.step} steps, {j.tokens} tokens; "
                      f"adapter: {j.adapter_path}")
        console.print(f"on {ev.examples} task examples: response loss {ev.base_loss:.2f} (base)"
                      f" -> {ev.adapter_loss:.2f} (adapter), next-token accuracy "
                      f"{100 * ev.base_accuracy:.0f}% -> {100 * ev.adapter_accuracy:.0f}%")
        _served_phase(console, daemon, ctl, j.name, dataset)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _digits_score(texts: list[str], records: list[dict[str, str]]) -> tuple[float, int]:
    """(share of the expected digits answered in their place, whole answers right)."""
    right = total = whole = 0
    for text, r in zip(texts, records, strict=True):
        want, got = r["output"].split(), text.split()
        right += sum(g == w for g, w in zip(got, want, strict=False))
        total += len(want)
        whole += got == want
    return right / max(total, 1), whole


async def _ask(endpoint: str, prompts: list[str], models: list[str | None]) -> list[str]:
    """Each prompt under each model, all at once (the batches mix the models), greedy."""
    from harli.client.inference import AsyncInferenceClient

    async with AsyncInferenceClient(endpoint, timeout_s=120) as client:
        done = await asyncio.gather(*(client.complete(p, max_tokens=24, temperature=0.0,
                                                      model=m)
                                      for m in models for p in prompts))
    return [c.text for c in done]


def _served_phase(console: Any, daemon: Any, ctl: Any, name: str, dataset: Path,
                  examples: int = 60) -> None:
    """The job's adapter asked through the running daemon, as its owner would: the task's
    exact-match accuracy served by the base model and by the adapter, in the same batches."""
    import json

    from harli.datasets import alpaca_prompt

    models = {m.name: m for m in ctl.models()}
    if name not in models:
        console.print(f"[red]the job's adapter is not served as {name!r}; see harli job logs")
        return
    records = [json.loads(line) for line in dataset.read_text().splitlines()[-examples:]]
    prompts = [alpaca_prompt(r) for r in records]
    base = models[next(iter(models))].name
    texts = asyncio.run(_ask(daemon.endpoint, prompts, [None, name]))
    scores = [_digits_score(part, records) for part in (texts[:examples], texts[examples:])]
    console.print(f"served, no restart: {examples} digits tasks asked through the daemon "
                  f"(greedy, base and adapter requests in the same batches): digits right "
                  f"{scores[0][0]:.0%} -> {scores[1][0]:.0%}, whole answers right "
                  f"{scores[0][1]}/{examples} -> {scores[1][1]}/{examples} (base model "
                  f"{base!r} -> adapter {name!r}; harli generate --model {name})")
    sample = records[0]
    console.print(f"  e.g. {sample['input']!r} -> base {texts[0].strip()!r}, adapter "
                  f"{texts[examples].strip()!r}")
    _http_phase(console, ctl, name, prompts[0])


def _http_phase(console: Any, ctl: Any, name: str, prompt: str) -> None:
    """The same adapter called over the OpenAI-compatible HTTP API, with the openai SDK."""
    from openai import OpenAI

    url = ctl.status().http_url
    if not url:
        console.print("[red]the HTTP API is not up; see the daemon log")
        return
    client = OpenAI(base_url=f"{url}/v1", api_key="unused-without-keys", max_retries=0)
    r = client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0)
    console.print(f"over HTTP, as any OpenAI client:\n"
                  f"  OpenAI(base_url={url + '/v1'!r}).completions.create(model={name!r}, "
                  f"prompt=..., max_tokens=24, temperature=0)\n"
                  f"  -> {r.choices[0].text.strip()!r} (finish_reason "
                  f"{r.choices[0].finish_reason}, {r.usage.total_tokens if r.usage else '?'} "
                  f"tokens)")


def _bench_phase(console: Any, args: argparse.Namespace) -> None:
    """``harli bench --quick``: the policies in turns over one changing load while a LoRA job
    trains; the point of the system in one table and a ratio with its interval."""
    from harli.bench.bench import QUICK, default_policies, print_table, run_bench, verdict

    policies = default_policies(4)
    console.rule("[bold]the point: finetune throughput inside the decode SLO")
    console.print(f"harli bench --quick: one workload (quiet, busy, bursty phases) of "
                  f"{QUICK['duration_s']:.0f} s; {', '.join(policies)} take turns in "
                  f"{QUICK['block_s']:g} s blocks; no profile, so the harli policy learns "
                  f"online ...")
    res = run_bench(args.dir.resolve() / "bench", QUICK["duration_s"], policies, None, 0, 1.0,
                    None, progress=lambda s: console.print(f"[dim]  {s}"),
                    block_s=QUICK["block_s"], settle_s=QUICK["settle_s"],
                    calib_s=QUICK["calib_s"])
    print_table(res, console)
    console.print(verdict(res))


class DemoCommand(Command):
    name = "demo"
    help = "start the daemon on the tiny model and stream a few requests through it"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", type=Path, default=Path(".harli/demo"),
                       help="runtime and state dirs of the demo daemon (model kept here)")
        p.add_argument("--max-tokens", type=int, default=48,
                       help="tokens per demo request (default: %(default)s)")
        p.add_argument("--steps", type=int, default=150, help="optimizer steps of the job")
        p.add_argument("--no-finetune", action="store_true", help="decode requests only")
        p.add_argument("--no-bench", action="store_true",
                       help="skip the closing harli bench --quick (about 2 minutes)")

    def run(self, args: argparse.Namespace) -> int:
        from rich.console import Console
        from rich.live import Live

        from harli.bench.local_daemon import LocalDaemon, pid_alive

        console = Console()
        # The OpenAI HTTP API on a free port (8000, its default, may be taken on this host).
        daemon = LocalDaemon(args.dir.resolve(), [f"http.port={_free_port()}"])
        console.rule("[bold]harli demo")
        console.print(f"starting [bold]harli daemon[/] (log: {daemon.log_path}) ...")
        t0 = time.monotonic()
        with daemon:
            kids = daemon.children()
            with daemon.client() as c:
                w = c.hello()
            console.print(f"ready in {time.monotonic() - t0:.1f} s: model {w.model} "
                          f"(max_model_len {w.max_model_len}), endpoint {daemon.endpoint}, "
                          f"decode_proc pid {kids}")
            view: dict[str, Any] = {}
            with Live(_live_table(view), console=console, refresh_per_second=10) as live:
                outs = asyncio.run(_stream_all(daemon.endpoint, args.max_tokens, view,
                                               lambda: live.update(_live_table(view))))
            console.print(_summary(outs))
            tpots = [c.tpot_s for c in outs if c.tpot_s]
            console.print(f"{len(outs)} concurrent streams, {sum(len(c.token_ids) for c in outs)}"
                          f" tokens; median TPOT {1e3 * statistics.median(tpots):.2f} ms")
            if not args.no_finetune:
                _finetune_phase(console, daemon, args)
            console.print("stopping the daemon with SIGTERM ...")
        clean = not any(pid_alive(p) for p in kids)
        socks = list(daemon.cfg.runtime_dir.glob("*.sock"))
        assert daemon.proc is not None
        console.print(f"daemon exit code {daemon.proc.returncode}; children left: "
                      f"{'none' if clean else kids}; sockets left: {socks or 'none'}")
        ok = daemon.proc.returncode == 0 and clean and not socks
        if not args.no_bench and not args.no_finetune:
            _bench_phase(console, args)
        return 0 if ok else 1
