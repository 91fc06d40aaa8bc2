"""``harli bench-memory``: the unified memory pool under a real load change, in one run.

One daemon (real decode_proc with vLLM, real finetune_proc training a LoRA job) goes through
two phases while a job trains:

1. **quiet** - a trickle of short requests: the free KV blocks are lent to the finetune, whose
   autograd-saved tensors go into them. Sampled from ``harli status`` every half second: the
   share of free KV blocks that is lent.
2. **burst** - many concurrent long requests: decode's KV demand jumps, the daemon reclaims
   the lease, and vLLM must never run out of blocks: its own preemption count (read from the
   scheduler's output every iteration) must stay 0, and every request must finish.

Greedy outputs of fixed prompts sent during the quiet phase (lending active, the finetune
writing into lent blocks) are compared with vLLM's own ``LLM.generate`` on a private KV cache.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

from harli.bench.greedy_check import compare_greedy
from harli.datasets import SAMPLE_DATASET

GREEDY_TOKENS = 64
GREEDY_LOGPROBS = 5
# Two float32 log-probs this close are a tie that batch shape decides (see greedy_check).
TIE_NATS = 1e-4


def _prompts(rng: random.Random, n: int, lo: int, hi: int) -> list[list[int]]:
    return [[rng.randrange(10, 500) for _ in range(rng.randrange(lo, hi + 1))] for _ in range(n)]


async def _load(endpoint: str, workers: int, until_s: float, prompt_len: tuple[int, int],
                max_tokens: tuple[int, int], pause_s: float, seed: int) -> dict[str, Any]:
    from harli.client.inference import AsyncInferenceClient, RequestError

    done: list[dict[str, Any]] = []
    errors: list[str] = []

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with AsyncInferenceClient(endpoint, timeout_s=600) as client:
            while time.monotonic() < until_s:
                [p] = _prompts(rng, 1, *prompt_len)
                want = rng.randrange(max_tokens[0], max_tokens[1] + 1)
                try:
                    out = await client.complete(p, max_tokens=want, temperature=0.0,
                                                ignore_eos=True)
                except RequestError as e:
                    errors.append(f"{e.code}: {e}")
                    continue
                done.append({"tokens": len(out.token_ids), "wanted": want,
                             "finish": out.finish_reason})
                if pause_s:
                    await asyncio.sleep(pause_s * rng.random() * 2)

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return {"requests": len(done), "errors": errors,
            "tokens": sum(d["tokens"] for d in done),
            "incomplete": sum(1 for d in done if d["tokens"] != d["wanted"]
                              or d["finish"] != "length")}


async def _greedy(endpoint: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from harli.client.inference import AsyncInferenceClient

    async with AsyncInferenceClient(endpoint, timeout_s=600) as client:
        outs = await asyncio.gather(*(client.complete(p, max_tokens=max_tokens, temperature=0.0,
                                                      ignore_eos=True) for p in prompts))
    return [o.token_ids for o in outs]


def _sampler(ctl: Any, samples: list[dict[str, Any]], stop: list[bool], phase: list[str]) -> None:
    while not stop:
        m = ctl.status().memory
        lent = m.groups_lent * m.blocks_per_group
        samples.append({"t": time.monotonic(), "phase": phase[0], "lent_blocks": lent,
                        "free_blocks": m.kv_blocks_free, "pages": dict(m.pages),
                        "lent_share": lent / (lent + m.kv_blocks_free)
                        if lent + m.kv_blocks_free else 0.0})
        time.sleep(0.5)


def run_bench(base_dir: Path, quiet_s: float, burst_s: float, burst_workers: int,
              seed: int = 0, extra: list[str] | None = None) -> dict[str, Any]:
    import threading

    from harli.bench.local_daemon import LocalDaemon
    from harli.bench.offline import OfflineRunner
    from harli.client.control import ControlClient
    from harli.ipc.jobs import JobSpec

    daemon = LocalDaemon(base_dir / "daemon", ['model.dtype="float32"',
                                               f"decode.max_num_seqs={max(32, burst_workers)}",
                                               'scheduler.policy="static:2"',
                                               *(extra or [])])
    rng = random.Random(seed)
    check_prompts = _prompts(rng, 8, 16, 300)
    res: dict[str, Any] = {"quiet_s": quiet_s, "burst_s": burst_s,
                           "burst_workers": burst_workers}
    with daemon, ControlClient(daemon.cfg.control_endpoint) as ctl:
        job = ctl.attach(JobSpec(name="bench-memory", dataset=str(SAMPLE_DATASET),
                                 max_seq_len=128,
                                 micro_batch_size=8, learning_rate=5e-3,
                                 lr_schedule="constant", max_steps=1_000_000,
                                 checkpoint_every=100))
        deadline = time.monotonic() + 120
        while ctl.status().memory.groups_lent == 0:  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise RuntimeError("nothing was lent within 120 s of attaching the job")
            time.sleep(0.2)
        samples: list[dict[str, Any]] = []
        stop: list[bool] = []
        phase = ["quiet"]
        with ControlClient(daemon.cfg.control_endpoint) as ctl2:
            th = threading.Thread(target=_sampler, args=(ctl2, samples, stop, phase),
                                  daemon=True)
            th.start()
            t0 = time.monotonic()
            greedy = asyncio.run(_greedy(daemon.endpoint, check_prompts, GREEDY_TOKENS))
            res["quiet"] = asyncio.run(_load(daemon.endpoint, 2, t0 + quiet_s, (16, 64),
                                             (32, 96), 0.5, seed))
            phase[0] = "burst"
            res["burst"] = asyncio.run(_load(daemon.endpoint, burst_workers,
                                             time.monotonic() + burst_s, (800, 1600),
                                             (128, 384), 0.0, seed + 1))
            phase[0] = "after"
            time.sleep(2.0)
            stop.append(True)
            th.join()
        st = ctl.status()
        detail = ctl.show(job.job_id)
        ctl.cancel(job.job_id)
        m = st.memory
        assert m is not None
        saved = m.saved_lease_bytes + m.saved_private_bytes
        quiet = [s["lent_share"] for s in samples if s["phase"] == "quiet"]
        burst = [s["lent_blocks"] for s in samples if s["phase"] == "burst"]
        res.update({
            "kv_blocks_total": m.kv_blocks_total, "blocks_per_group": m.blocks_per_group,
            "quiet_lent_share_min": min(quiet) if quiet else None,
            "quiet_lent_share_median": statistics.median(quiet) if quiet else None,
            "burst_lent_blocks_min": min(burst) if burst else None,
            "vllm_preemptions": m.preemptions, "reclaims": m.reclaims,
            "reclaim_p50_s": m.reclaim_p50_s, "reclaim_max_s": m.reclaim_max_s,
            "scrubs": m.scrubs, "scrub_max_s": m.scrub_max_s,
            "saved_bytes": saved,
            "saved_in_lease_share": m.saved_lease_bytes / saved if saved else None,
            "fallback_tensors": m.fallback_tensors,
            "job_step": detail.job.step,
            # What a failed run needs to say why: the job's own events (a finetune death, its
            # resume) and every restart of either child.
            "job_events": [f"{e.kind}: {e.message}" for e in detail.events],
            "children": {c.name: {"restarts": c.restarts, "forced_restarts": c.forced_restarts,
                                  "state": c.state} for c in st.children},
            "samples": samples,
        })
    with OfflineRunner(daemon.cfg) as offline:
        ref = offline.generate(check_prompts, GREEDY_TOKENS, logprobs=GREEDY_LOGPROBS)
    cmp = compare_greedy(greedy, ref["token_ids"], ref["logprobs"], TIE_NATS)
    res["greedy"] = cmp.summary()
    res["greedy_outputs"] = {"daemon": greedy, "offline": ref["token_ids"]}
    res["greedy_identical"] = cmp.identical == cmp.prompts
    res["greedy_ok"] = cmp.ok
    return res


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.1f} ms"

    t = Table(title=f"Unified memory pool: {r['quiet_s']:.0f} s quiet, then {r['burst_s']:.0f} s "
                    f"burst of {r['burst_workers']} long streams, a LoRA job training throughout")
    t.add_column("measure")
    t.add_column("value", justify="right")
    rows = [
        ("free KV blocks lent, quiet phase (min / median)",
         f"{pct(r['quiet_lent_share_min'])} / {pct(r['quiet_lent_share_median'])}"),
        ("lent blocks left at the burst's low point", str(r["burst_lent_blocks_min"])),
        ("saved-for-backward bytes placed in the lease",
         f"{pct(r['saved_in_lease_share'])} of {r['saved_bytes'] / 2**30:.1f} GiB"),
        ("tensors that fell back to private memory", str(r["fallback_tensors"])),
        ("reclaims (by outcome)", ", ".join(f"{k} {v}" for k, v in r["reclaims"].items())
         or "none"),
        ("reclaim latency p50 / max", f"{ms(r['reclaim_p50_s'])} / {ms(r['reclaim_max_s'])}"),
        ("blocks zeroed by decode on return: returns / slowest",
         f"{r['scrubs']} / {ms(r['scrub_max_s'])}"),
        ("vLLM preemptions", str(r["vllm_preemptions"])),
        ("burst requests done / incomplete / errors",
         f"{r['burst']['requests']} / {r['burst']['incomplete']} / {len(r['burst']['errors'])}"),
        ("quiet requests done / errors",
         f"{r['quiet']['requests']} / {len(r['quiet']['errors'])}"),
        ("finetune optimizer steps", str(r["job_step"])),
        ("greedy outputs against vLLM LLM.generate (private KV)", r["greedy"]),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
