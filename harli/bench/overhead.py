"""``harli bench-overhead``: tokens/s through the daemon against vLLM's own ``LLM.generate`` on
the same model, engine settings and prompts, measured in one run.

Both sides run vLLM in-process with greedy sampling and ``ignore_eos`` so they do identical
work; the daemon side adds everything Harli puts on the path (client, ZMQ, daemon routing,
decode_proc's loop, IO threads and telemetry). The two are measured one after the other (never
at once: they would share the 2 cores), each round timed from first send to last token.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any


def make_prompts(n: int, seed: int, min_len: int = 16, max_len: int = 64) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 500) for _ in range(rng.randrange(min_len, max_len + 1))]
            for _ in range(n)]


async def _daemon_round(endpoint: str, prompts: list[list[int]], max_tokens: int,
                        concurrent: bool) -> tuple[float, list[list[int]]]:
    from harli.client.inference import AsyncInferenceClient

    async with AsyncInferenceClient(endpoint, timeout_s=300) as client:
        def one(p: list[int]) -> Any:
            return client.complete(p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

        t0 = time.perf_counter()
        if concurrent:
            outs = await asyncio.gather(*(one(p) for p in prompts))
        else:
            outs = [await one(p) for p in prompts]
        return time.perf_counter() - t0, [o.token_ids for o in outs]


def run_bench(base_dir: Path, requests: int, max_tokens: int, rounds: int,
              seed: int = 0) -> dict[str, Any]:
    from harli.bench.local_daemon import LocalDaemon
    from harli.bench.offline import OfflineRunner
    from harli.runtime import decode_cores, format_cpu_list, pin_to

    # The finetune process is not on the serving path; it stays off so that only the path is
    # measured (``harli bench`` measures the two together).
    daemon = LocalDaemon(base_dir, ['model.dtype="float32"', f"decode.max_num_seqs={requests}",
                                    "finetune.enabled=false"])
    # "batch": all requests at once; "single": one request at a time (one prompt per
    # LLM.generate call on the offline side, as the daemon gets them).
    cases = {"batch": make_prompts(requests, seed), "single": make_prompts(4, seed + 1)}
    results: dict[str, Any] = {"requests": requests, "max_tokens": max_tokens,
                               "rounds": rounds, "cases": {}}
    with daemon, OfflineRunner(daemon.cfg) as offline:
        # The load generator stands for remote clients: keep it off the engine's cores.
        allowed = os.sched_getaffinity(0)
        engine = decode_cores(daemon.cfg.decode.cpu_cores, daemon.cfg.decode.cpu_threads)
        pin_to((allowed - engine) if engine else None, "bench client")
        results["decode_cores"] = format_cpu_list(engine)
        for name, prompts in cases.items():
            concurrent = name == "batch"
            groups = [prompts] if concurrent else [[p] for p in prompts]

            def offline_round(groups: list[list[list[int]]] = groups) -> tuple[float, Any]:
                outs = [offline.generate(g, max_tokens) for g in groups]
                return (sum(o["elapsed_s"] for o in outs),
                        [ids for o in outs for ids in o["token_ids"]])

            def daemon_round(prompts: list[list[int]] = prompts,
                             concurrent: bool = concurrent) -> tuple[float, Any]:
                return asyncio.run(_daemon_round(daemon.endpoint, prompts, max_tokens,
                                                 concurrent))

            offline_round()  # warm-up, not timed
            daemon_round()
            off_s, ours_s = [], []
            off_ids = ours_ids = None
            for _ in range(rounds):  # interleaved, so drift in the machine hits both alike
                dt, off_ids = offline_round()
                off_s.append(dt)
                dt, ours_ids = daemon_round()
                ours_s.append(dt)
            tokens = len(prompts) * max_tokens
            # This VM's speed drifts by +-25 % between seconds; the ratio of two rounds run
            # back to back is steadier than either, so the overhead is the median of the
            # paired ratios.
            ratios = sorted(o / d for o, d in zip(off_s, ours_s, strict=True))
            results["cases"][name] = {
                "prompts": len(prompts), "tokens": tokens,
                "offline_s": off_s, "daemon_s": ours_s,
                "offline_tok_s": tokens / statistics.median(off_s),
                "daemon_tok_s": tokens / statistics.median(ours_s),
                "overhead_pct": 100.0 * (1.0 - statistics.median(ratios)),
                "overhead_pct_iqr": [100.0 * (1.0 - ratios[3 * len(ratios) // 4]),
                                     100.0 * (1.0 - ratios[len(ratios) // 4])],
                "greedy_identical": ours_ids == off_ids,
            }
    return results


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Serving-path overhead: {results['max_tokens']} tokens per request, "
                    f"{results['rounds']} interleaved rounds, decode on cores "
                    f"{results['decode_cores']}")
    for col in ("case", "requests", "vLLM LLM.generate tok/s", "harli daemon tok/s",
                "overhead (median of pairs)", "IQR", "greedy identical"):
        t.add_column(col, justify="right")
    for name, c in results["cases"].items():
        lo, hi = c["overhead_pct_iqr"]
        t.add_row(name, str(c["prompts"]), f"{c['offline_tok_s']:.0f}",
                  f"{c['daemon_tok_s']:.0f}", f"{c['overhead_pct']:+.1f}%",
                  f"{lo:+.1f}% .. {hi:+.1f}%", "yes" if c["greedy_identical"] else "NO")
    Console().print(t)
