"""``harli bench-lora``: what serving LoRA adapters costs decode, measured in one run.

One daemon (the finetune off: decode alone is measured) serves batches of the same size and
length under four mixes of models: the base model only, one adapter for every request, the
requests spread over four distinct adapters, and half base, half spread over the four. The
mixes take turns round by round, in an order shuffled by the seed, so the host's drift falls
on each alike. Per mix: decode's per-token gaps (TPOT, from the engine's own token times) at
p50 and p99, and the tokens/s of the round (first send to last token); each mix's figures
against the base model's of the same round, the median of those paired ratios and their
range. The adapters are random LoRA weights made with PEFT (``make_adapter``) at the given
rank, on the projections a job trains by default.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

from harli.bench.overhead import make_prompts
from harli.ipc.jobs import DEFAULT_TARGET_MODULES

MIXES = ("base", "1 adapter", "4 adapters", "half base")


def make_adapter(model_dir: Path, out: Path, seed: int, r: int = 8,
                 targets: tuple[str, ...] = tuple(DEFAULT_TARGET_MODULES)) -> Path:
    """A LoRA adapter of random weights (B not zero, so it changes the outputs), saved by PEFT
    as a training run saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                            init_lora_weights=False))
    peft.save_pretrained(str(out))
    return out


def register_adapters(daemon: Any, ctl: Any, base_dir: Path, n: int, prefix: str,
                      seed: int, rank: int = 8) -> list[str]:
    """``n`` random adapters (``make_adapter``, rank capped at the daemon's
    ``lora.max_lora_rank``) registered on ``daemon`` as PREFIX-0, PREFIX-1, ...; their
    names. ValueError with LoRA serving off."""
    if not daemon.cfg.lora.enabled:
        raise ValueError("requests that name adapters need LoRA serving on (lora.enabled)")
    rank = min(rank, daemon.cfg.lora.max_lora_rank)
    return [ctl.add_adapter(f"{prefix}-{i}", str(make_adapter(
        daemon.cfg.model_path, base_dir / f"{prefix}-adapter-{i}", seed + i, rank))).name
        for i in range(n)]


def models_of(mix: str, n: int, adapters: list[str]) -> list[str | None]:
    """The model of each of ``n`` requests under ``mix``."""
    if mix == "base":
        return [None] * n
    if mix == "1 adapter":
        return [adapters[0]] * n
    if mix == "4 adapters":
        return [adapters[i % 4] for i in range(n)]
    if mix == "half base":
        return [None if i % 2 == 0 else adapters[(i // 2) % 4] for i in range(n)]
    raise ValueError(f"unknown mix {mix!r}; one of {', '.join(MIXES)}")


async def _round(endpoint: str, prompts: list[list[int]], models: list[str | None],
                 max_tokens: int) -> tuple[float, list[float]]:
    from harli.client.inference import AsyncInferenceClient

    async with AsyncInferenceClient(endpoint, timeout_s=300) as client:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(client.complete(p, max_tokens=max_tokens, temperature=0.0,
                                                      ignore_eos=True, model=m)
                                      for p, m in zip(prompts, models, strict=True)))
        elapsed = time.perf_counter() - t0
    gaps = [b - a for o in outs for a, b in zip(o.token_times_s, o.token_times_s[1:],
                                                 strict=False) if b > a]
    return elapsed, gaps


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_bench(base_dir: Path, batch: int, max_tokens: int, rounds: int, rank: int = 8,
              seed: int = 0) -> dict[str, Any]:
    import os

    from harli.bench.local_daemon import LocalDaemon
    from harli.client.control import ControlClient
    from harli.runtime import decode_cores, pin_to

    daemon = LocalDaemon(base_dir / "daemon", ['model.dtype="float32"',
                                               f"decode.max_num_seqs={max(batch, 8)}",
                                               "finetune.enabled=false",
                                               f"lora.max_lora_rank={max(16, rank)}"])
    prompts = make_prompts(batch, seed)
    rng = random.Random(seed)
    res: dict[str, Any] = {"batch": batch, "max_tokens": max_tokens, "rounds": rounds,
                           "rank": rank, "mixes": {m: {"tok_s": [], "p50_ms": [], "p99_ms": []}
                                                   for m in MIXES}}
    with daemon, ControlClient(daemon.cfg.control_endpoint) as ctl:
        allowed = os.sched_getaffinity(0)
        engine = decode_cores(daemon.cfg.decode.cpu_cores, daemon.cfg.decode.cpu_threads)
        pin_to((allowed - engine) if engine else None, "bench client")
        adapters = register_adapters(daemon, ctl, base_dir, 4, "bench", seed, rank)
        for mix in MIXES:  # warm-up: every adapter loaded, nothing timed
            asyncio.run(_round(daemon.endpoint, prompts, models_of(mix, batch, adapters), 4))
        for _ in range(rounds):
            order = list(MIXES)
            rng.shuffle(order)
            for mix in order:
                elapsed, gaps = asyncio.run(_round(daemon.endpoint, prompts,
                                                   models_of(mix, batch, adapters), max_tokens))
                m = res["mixes"][mix]
                m["tok_s"].append(batch * max_tokens / elapsed)
                m["p50_ms"].append(1000 * _pct(gaps, 0.5))
                m["p99_ms"].append(1000 * _pct(gaps, 0.99))
    base = res["mixes"]["base"]
    for mix in MIXES:
        m = res["mixes"][mix]
        for key in ("tok_s", "p50_ms", "p99_ms"):
            paired = sorted(x / b for x, b in zip(m[key], base[key], strict=True))
            m[f"{key}_median"] = statistics.median(m[key])
            m[f"{key}_vs_base"] = [statistics.median(paired), paired[0], paired[-1]]
    return res


def print_table(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"LoRA serving cost: batches of {res['batch']} requests x "
                    f"{res['max_tokens']} tokens, rank {res['rank']}, {res['rounds']} "
                    f"interleaved rounds (vs base: median of the paired ratios, min-max)")
    for col in ("mix", "tok/s", "vs base", "TPOT p50 ms", "vs base", "TPOT p99 ms", "vs base"):
        t.add_column(col, justify="right")

    def rel(v: list[float]) -> str:
        return f"{v[0]:.2f} ({v[1]:.2f}-{v[2]:.2f})"

    for mix, m in res["mixes"].items():
        t.add_row(mix, f"{m['tok_s_median']:.0f}", rel(m["tok_s_vs_base"]),
                  f"{m['p50_ms_median']:.2f}", rel(m["p50_ms_vs_base"]),
                  f"{m['p99_ms_median']:.2f}", rel(m["p99_ms_vs_base"]))
    Console().print(t)
