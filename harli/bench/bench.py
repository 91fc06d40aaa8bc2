"""``harli bench``: the quota policies side by side against one continuous, seeded, changing
inference load while a LoRA job trains, in a switchback design, with 95 % intervals.

One daemon serves the whole run (the real decode and finetune processes). The workload (Poisson
arrivals, one load phase per cycle, quiet, busy and bursty in turn; ``harli.bench.workload``)
is replayed once, from start to end; meanwhile the policies take turns in short blocks,
switched live through the control API, each cycle of blocks in an order shuffled by the seed,
so that every policy of a cycle faces the same load and the host's drifts fall on every policy
alike. A settling margin after each switch is left
out of both sides' counts. Per block: decode's inter-token gaps (from the engine's own token
times) against the TPOT SLO, and the job's trained tokens. ``harli.bench.blocks`` pools them
per policy and gives each figure a block-bootstrap interval; the verdict compares harli with
the best static level whose interval meets the target and with the best mix in hindsight.

``--slo auto`` calibrates first, in the same run: decode alone at the workload's load, and the
SLO is a stated margin over the gap that decode alone keeps at the attainment target.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harli.bench import blocks as bl
from harli.bench import plotting
from harli.datasets import SAMPLE_DATASET

TARGET = 0.99  # attainment per token the SLO is held to
# --slo auto: the SLO is this many times the gap decode alone keeps at TARGET.
SLO_MARGIN = 1.2
# The run's shape: `harli bench`'s defaults, and --quick's (under 2 minutes on 2 cores, daemon
# start included). Cycles come in whole turns of the load phases, at least two of each.
DEFAULTS = {"duration_s": 240.0, "block_s": 2.5, "settle_s": 0.5, "calib_s": 20.0}
QUICK = {"duration_s": 72.0, "block_s": 2.0, "settle_s": 0.4, "calib_s": 8.0}
# The bench's job: micro-steps of JOB_MICRO_BATCH x JOB_SEQ_LEN tokens (a fraction of a second
# at every level), so that a block's trained tokens come from micro-steps that ran in it.
JOB_SEQ_LEN = 128
JOB_MICRO_BATCH = 4


async def _replay(endpoint: str, requests: list[Any], seed: int, t0: float | None = None,
                  adapters: list[str] | None = None) -> list[dict[str, Any]]:
    """Send each request at its arrival time (from ``t0``, monotonic; default: now), those
    marked ``adapter`` for one of ``adapters`` in turn; return per request its token times
    (the engine's wall-clock stamps)."""
    from harli.client.inference import AsyncInferenceClient, RequestError

    rng = random.Random(seed)
    prompts = [[rng.randrange(10, 500) for _ in range(r.prompt_len)] for r in requests]
    out: list[dict[str, Any]] = []
    async with AsyncInferenceClient(endpoint, timeout_s=600) as client:
        start = time.monotonic() if t0 is None else t0

        async def one(i: int) -> None:
            r = requests[i]
            await asyncio.sleep(max(0.0, start + r.arrival_s - time.monotonic()))
            times: list[float] = []
            model = adapters[i % len(adapters)] if adapters and r.adapter else None
            try:
                async for chunk in client.generate(prompts[i], max_tokens=r.output_len,
                                                   temperature=0.0, ignore_eos=True,
                                                   model=model):
                    times.extend(chunk.token_times_s)
            except RequestError as e:
                out.append({"i": i, "error": str(e), "times": times, "phase": r.phase})
                return
            out.append({"i": i, "times": times, "phase": r.phase})

        await asyncio.gather(*(one(i) for i in range(len(requests))))
    return out


def _gaps(results: list[dict[str, Any]]) -> list[float]:
    return [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]


def calibrate_slo_ms(gaps_s: list[float], target: float = TARGET,
                     margin: float = SLO_MARGIN) -> float:
    """The tightest SLO decode alone meets at ``target`` (the ``target`` quantile of its
    gaps), times ``margin``: what the finetune may add without the SLO being one that even
    decode alone misses."""
    if not gaps_s:
        raise ValueError("no decode tokens to calibrate the SLO on")
    ordered = sorted(gaps_s)
    k = min(len(ordered) - 1, math.ceil(target * len(ordered)) - 1)
    return 1000.0 * margin * ordered[max(0, k)]


def phase_at(spec: Any, t_s: float) -> str:
    """The workload phase in force ``t_s`` seconds after its start (the last one after it)."""
    end = 0.0
    for ph in spec.phases:
        end += ph.duration_s
        if t_s < end:
            return str(ph.name)
    return str(spec.phases[-1].name)


SAMPLE_S = 0.1  # how often the level and the job's token count are read


def _sampler(ctl: Any, job_id: int, samples: list[dict[str, float | None]],
             stop: threading.Event, t0_wall: float) -> None:
    """Every ``SAMPLE_S``: the level in force and the job's trained tokens, stamped in wall
    time since ``t0_wall`` (the clock the engine stamps tokens in, and the blocks' windows)."""
    while not stop.is_set():
        st = ctl.status()
        job = ctl.show(job_id).job
        q = st.scheduler.bound_quantile if st.scheduler is not None else None
        samples.append({"t": time.time() - t0_wall, "level": st.level, "tokens": job.tokens,
                        "bound_quantile": q,
                        "groups_lent": st.memory.groups_lent if st.memory else None})
        stop.wait(SAMPLE_S)



@contextlib.contextmanager
def _off_cores(cores: set[int] | None) -> Iterator[None]:
    """Keep this process (the bench's clients) off decode's cores while the bench runs, as
    remote clients would be: their token handling would otherwise be measured as decode's
    TPOT. The caller's mask is restored after (the demo and the tests call the bench)."""
    allowed = os.sched_getaffinity(0)
    if cores and allowed - cores:
        os.sched_setaffinity(0, allowed - cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)



def default_policies(levels: int) -> list[str]:
    """The policies a bench runs unless told: decode alone, every static level, harli. (The
    naive policy, always the top level, is ``static:K``.)"""
    return ["decode-only", *[f"static:{lv}" for lv in range(1, levels + 1)], "harli"]


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def run_bench(base_dir: Path, duration_s: float, policies: list[str], slo_ms: float | None,
              seed: int, rate_scale: float, profile: Path | None,
              extra: list[str] | None = None, progress: Any = None,
              max_batched_tokens: int = 32, workload: str = "decode",
              block_s: float = DEFAULTS["block_s"], settle_s: float = DEFAULTS["settle_s"],
              calib_s: float = DEFAULTS["calib_s"], target: float = TARGET,
              resamples: int = 2000, adapter_share: float = 0.0) -> dict[str, Any]:
    """One switchback run; returns everything as a JSON-able dict (every block kept).
    ``adapter_share`` of the requests (calibration's too) name one of ``ADAPTERS`` random
    LoRA adapters registered for the run."""
    from harli.bench.local_daemon import LocalDaemon
    from harli.bench.workload import CYCLE_PHASES, cycle_spec, default_spec, generate
    from harli.client.control import ControlClient
    from harli.ipc.jobs import JobSpec
    from harli.runtime import decode_cores

    if not 0 <= settle_s < block_s:
        raise ValueError(f"settle_s must be in [0, block_s), got {settle_s} and {block_s}")
    say = progress or (lambda _: None)
    # Chunked prefill with a small token budget per iteration (Sarathi-style), as any TPOT
    # SLO deployment runs: one long prompt then costs several short iterations, not one long
    # one that stalls every stream (measured with the tiny model: a 256-token chunk costs
    # ~18 ms on top of a ~5 ms decode iteration, a 32-token one ~2 ms).
    overrides = ['model.dtype="float32"', "decode.max_num_seqs=32",
                 f"decode.max_num_batched_tokens={max_batched_tokens}",
                 'scheduler.policy="decode-only"',
                 *([f'predictor.profile="{profile}"'] if profile else []), *(extra or [])]
    # Whole cycles (every policy gets the same number of blocks) in whole turns of the load
    # phases, at least two of each (a phase's spread is measured between its cycles).
    turn = len(CYCLE_PHASES)
    cycles = turn * max(2, round(duration_s / (block_s * len(policies) * turn)))
    cycle_s = len(policies) * block_s
    run_s = cycles * cycle_s
    # Common random numbers: a cycle's arrivals are drawn for one block and repeated in each,
    # so its blocks differ by the policy, not by how many requests happened to land in them.
    spec = cycle_spec(cycle_s, cycles, seed, rate_scale, workload, block_s=block_s,
                      adapter_share=adapter_share)
    requests = generate(spec)
    order = bl.shuffled_cycles(policies, cycles, seed)
    res: dict[str, Any] = {
        "duration_s": run_s, "block_s": block_s, "settle_s": settle_s, "cycles": cycles,
        "seed": seed, "rate_scale": rate_scale, "target": target, "policies": policies,
        "order": order, "requests": len(requests), "profile": str(profile) if profile else None,
        "adapter_share": adapter_share,
        "adapter_requests": sum(1 for r in requests if r.adapter),
        "workload": {"kind": workload, "phases": [vars(p) for p in spec.phases],
                     "prompt": vars(spec.prompt), "output": vars(spec.output),
                     "max_batched_tokens": max_batched_tokens},
        "phase_weights": bl.phase_weights((p.name, p.duration_s) for p in spec.phases)}
    # The daemon's dir is the bench's scratch, fresh every run: a job left by an earlier run
    # (`make run` reuses .harli/demo) would resume ahead of ours.
    shutil.rmtree(base_dir / "daemon", ignore_errors=True)
    daemon = LocalDaemon(base_dir / "daemon", overrides)
    # The daemon starts first: it pins decode from the host's whole mask.
    with daemon, ControlClient(daemon.cfg.control_endpoint) as ctl, \
            _off_cores(decode_cores(daemon.cfg.decode.cpu_cores, daemon.cfg.decode.cpu_threads)):
        res["levels"] = daemon.cfg.finetune.levels
        adapters = _register_adapters(daemon, ctl, base_dir, seed) if adapter_share else []
        if slo_ms is None:
            ctl.set_policy("decode-only")
            calib = default_spec(calib_s, seed + 7919, rate_scale, workload, adapter_share)
            say(f"--slo auto: decode alone for {calib_s:.0f} s of the workload's phases")
            gaps = _gaps(asyncio.run(_replay(daemon.endpoint, generate(calib), seed + 1,
                                             adapters=adapters)))
            slo_ms = calibrate_slo_ms(gaps, target)
            res["slo_auto"] = {
                "seconds": calib_s, "tokens": len(gaps), "margin": SLO_MARGIN,
                "decode_alone_ms_at_target": slo_ms / SLO_MARGIN,
                "decode_alone_median_ms": 1000 * statistics.median(gaps),
                "how": f"{SLO_MARGIN:g} x the gap decode alone kept for {target:.0%} of "
                       f"{len(gaps)} tokens over {calib_s:.0f} s of the workload"}
        res["slo_ms"] = slo_ms
        job = ctl.attach(JobSpec(name="bench", dataset=str(SAMPLE_DATASET),
                                 max_seq_len=JOB_SEQ_LEN, micro_batch_size=JOB_MICRO_BATCH,
                                 learning_rate=1e-4,
                                 lr_schedule="constant", max_steps=10_000_000,
                                 checkpoint_every=10_000_000))
        ctl_sampler = ControlClient(daemon.cfg.control_endpoint)
        samples: list[dict[str, float | None]] = []
        stop = threading.Event()
        replayed: dict[str, Any] = {}
        sampler: threading.Thread | None = None
        try:
            _warm_up(ctl, job.job_id, say)
            say(f"{cycles} cycles of {len(policies)} blocks of {block_s:g} s ({run_s:.0f} s, "
                f"{len(requests)} requests), the order shuffled in each cycle")
            cpu0 = cpu_times()
            # The schedule starts 0.2 s from now (the replay's clients are connected by then);
            # the engine stamps tokens in wall time, so the run's origin is taken in it too.
            t0 = time.monotonic() + 0.2
            t0_wall = time.time() + 0.2
            replay = threading.Thread(target=lambda: replayed.update(results=asyncio.run(
                _replay(daemon.endpoint, requests, seed * 1000 + 1, t0, adapters))),
                daemon=True)
            replay.start()
            sampler = threading.Thread(target=_sampler,
                                       args=(ctl_sampler, job.job_id, samples, stop, t0_wall),
                                       daemon=True)
            sampler.start()
            raw = _run_blocks(ctl, order, t0, block_s, settle_s, slo_ms)
            replay.join()
            res["host_steal_pct"] = steal_pct(cpu0, cpu_times())
            res["predictor"] = _predictor(ctl, t0_wall)
        finally:
            stop.set()
            if sampler is not None:
                sampler.join(timeout=30)  # its client must not be closed under a request
            ctl_sampler.close()
            ctl.cancel(job.job_id)
    results = replayed.get("results", [])
    windows = [(b["w0"] - t0_wall, b["w1"] - t0_wall) for b in raw]
    counts = bl.count_gaps([[t - t0_wall for t in r["times"]] for r in results], windows,
                           slo_ms / 1000)
    trained = bl.trained_in_windows(
        [(float(s["t"] or 0.0), int(s["tokens"] or 0), int(s["level"] or 0)) for s in samples],
        windows)
    blocks = [bl.Block(policy=b["policy"], cycle=b["cycle"],
                       phase=phase_at(spec, (w0 + w1) / 2), start_s=w0, end_s=w1, tokens=n,
                       tokens_ok=ok, trained_tokens=t)
              for b, (w0, w1), (n, ok), t in zip(raw, windows, counts, trained, strict=True)]
    res["errors"] = sum(1 for r in results if "error" in r)
    res["blocks"] = [asdict(b) for b in blocks]
    res["decision_p99_us"] = _decision_p99(raw)
    res["decisions_by_reason"] = [{"policy": b["policy"], "cycle": b["cycle"],
                                   "by_reason": b["decisions_by_reason"]} for b in raw]
    v = bl.verdict(blocks, res["phase_weights"], target,
                   "harli" if "harli" in policies else "", resamples, seed)
    res["verdict"] = asdict(v)
    res["level_samples"] = samples
    # (seconds since the run began, gap) for every token, for the plot.
    res["tpot_series"] = [(b - t0_wall, b - a) for r in results
                          for a, b in zip(r["times"], r["times"][1:], strict=False)]
    return res


ADAPTERS = 2  # distinct adapters the requests that name one are spread over


def _register_adapters(daemon: Any, ctl: Any, base_dir: Path, seed: int) -> list[str]:
    """``ADAPTERS`` random adapters, registered and asked once each, so that the run
    measures them served, not loaded."""
    from harli.bench.lora import register_adapters
    from harli.bench.workload import Request

    names = register_adapters(daemon, ctl, base_dir, ADAPTERS, "bench", seed)
    warm = [Request(0.0, 8, 4, "warm-up", adapter=True) for _ in names]
    asyncio.run(_replay(daemon.endpoint, warm, seed, adapters=names))
    return names


def _warm_up(ctl: Any, job_id: int, say: Any, timeout_s: float = 120.0) -> None:
    """Let the job start and train at a middle level before the first block: loading the
    model and the first micro-step would otherwise land on whichever policy comes first."""
    say("warming up: the job starts training")
    ctl.set_policy("static:1")
    deadline = time.monotonic() + timeout_s
    while ctl.show(job_id).job.tokens == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the bench's job trained nothing in {timeout_s:.0f} s")
        time.sleep(0.2)


def _run_blocks(ctl: Any, order: list[list[str]], t0: float, block_s: float,
                settle_s: float, slo_ms: float) -> list[dict[str, Any]]:
    """Switch policies on the block schedule; per block its counted window (wall clock, as
    the engine stamps tokens) and the scheduler's decision times."""
    out: list[dict[str, Any]] = []
    k = 0
    for cycle, policies in enumerate(order):
        for policy in policies:
            start = t0 + k * block_s
            k += 1
            _sleep_until(start)
            ctl.set_policy(policy, tpot_slo_ms=slo_ms)
            _sleep_until(start + settle_s)
            w0 = time.time()
            _sleep_until(start + block_s)
            w1 = time.time()
            sched = ctl.status().scheduler  # decision times of the policy's blocks so far
            out.append({"policy": policy, "cycle": cycle, "w0": w0, "w1": w1,
                        "decision_p99_us": sched.decision_p99_us if sched else None,
                        "decision_cpu_p99_us": sched.decision_cpu_p99_us if sched else None,
                        # Why the policy chose its levels in this block, by the reason's first
                        # word and level (e.g. harli "infeasible" at 0 through a busy stretch).
                        "decisions_by_reason": {
                            kind: {str(lv): n for lv, n in sorted(by.items())}
                            for kind, by in sorted(sched.decisions_by_reason.items())}
                        if sched else {}})
    return out


def _predictor(ctl: Any, t0_wall: float) -> dict[str, Any]:
    """What harli's predictor stood on at the end: a profile, or what it learnt online and
    when (seconds from the run's start; negative: before the first block)."""
    p = ctl.status().predictor
    if p is None:
        return {}

    def rel(t: float | None) -> float | None:
        return None if t is None else t - t0_wall

    return {"mode": p.mode, "profile": p.profile, "since_s": rel(p.since),
            "online_refits": p.online_refits,
            "levels_learnt_s": {str(k): rel(v) for k, v in sorted(p.levels_learnt.items())}}


def predictor_line(res: dict[str, Any]) -> str:
    """How the harli policy's predictor came to be, in words."""
    p = res.get("predictor") or {}
    if p.get("profile"):
        return f"harli's predictor: profile {p['profile']}"
    since = p.get("since_s")
    if since is None:
        return "harli's predictor: no profile, and it never left the conservative prior"
    levels = ", ".join(f"L{k} at {v:+.0f} s" for k, v in p.get("levels_learnt_s", {}).items()
                       if v is not None)
    return (f"harli's predictor: no profile, as a fresh daemon; stage 1 learnt online at "
            f"{since:+.0f} s from the first block ({p.get('online_refits', 0)} fits), each "
            f"level's own slowdown {'at ' + levels if levels else 'not yet'}")


def _decision_p99(raw: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per policy, the p99 decision time (CPU and wall) in µs over all its blocks: the daemon
    keeps a policy's decision times across switches, so its last block's figure is that."""
    return {b["policy"]: {key: b[key] for key in ("decision_cpu_p99_us", "decision_p99_us")}
            for b in raw}


def _ci(e: dict[str, Any], spec: str, pct: bool = False) -> str:
    """An Estimate (as a dict) as ``value (lo-hi)``, with `` %`` after the value if ``pct``."""
    def f(x: float) -> str:
        return format(100 * x if pct else x, spec)

    if e["value"] is None:
        return "-"
    text = f(e["value"]) + (" %" if pct else "")
    return text if e["lo"] is None else f"{text} ({f(e['lo'])}-{f(e['hi'])})"


def verdict(res: dict[str, Any]) -> str:
    """The run's point in plain words, every figure with its 95 % interval."""
    v = res["verdict"]
    target = v["target"]
    pols = v["policies"]
    parts = []
    h = pols.get("harli")
    solo = pols.get("decode-only")
    if h is not None:
        parts.append(f"harli kept {_ci(h['attainment'], '.1f', True)} of tokens within the "
                     f"{res['slo_ms']:.1f} ms SLO" +
                     (f" (decode alone: {_ci(solo['attainment'], '.1f', True)})" if solo
                      else ""))
        best = v["best_static"]
        r = v["ratio"]
        if best is None and not any(bl.level_of(p) for p in pols):
            parts.append(f"; no static level above 0 ran in this bench, so there is no ratio "
                         f"to report ({h['tok_s']['value'] or 0:.0f} finetune tok/s)")
        elif best is None:
            parts.append(f"; no static level's interval met {target:.0%} per token, so there "
                         f"is no ratio to report")
        elif r["value"] is None:
            parts.append(f"; there is no ratio to {best}: some load phase has no block of "
                         f"harli or of {best} (run more cycles)")
        elif r["lo"] is None:
            parts.append(f"and trained {r['value']:.2f}x the tokens/s of {best}, the best "
                         f"static level meeting {target:.0%} (too few cycles for an interval)")
        else:
            parts.append(f"and trained {r['value']:.2f}x (95 % CI {r['lo']:.2f}-{r['hi']:.2f}) "
                         f"the tokens/s of {best}, the best static level whose interval meets "
                         f"{target:.0%} per token")
            if r["lo"] <= 1.0 <= r["hi"]:
                parts.append(f"; whether harli trains more than {best} is not decided by "
                             f"this run")
        if v["undecided"]:
            parts.append(f"; the data cannot place {', '.join(v['undecided'])} (its interval "
                         f"straddles {target:.0%})")
        fr = v["fraction_of_best_mix"]
        if fr["value"] is not None:
            parts.append(f"; it reached {_ci(fr, '.2f')} of the best mix in hindsight (a "
                         f"fixed level per load phase, the mix that trained most while meeting "
                         f"{target:.0%} per token over all phases)")
    steal = res.get("host_steal_pct")
    if steal is not None and steal >= HOST_STEAL_WARN_PCT:
        parts.append(f"; the hypervisor took {steal:.0f} % of this VM's CPU time during the run")
    return " ".join(parts).replace(" ;", ";")


# Steal over the run from which the verdict names it (a quiet VM here shows ~1 %).
HOST_STEAL_WARN_PCT = 5.0


def print_table(res: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    v = res["verdict"]
    how = res.get("slo_auto", {}).get("how")
    t = Table(title=f"harli bench: {res['cycles']} cycles of {len(res['policies'])} blocks of "
                    f"{res['block_s']:g} s over one {res['duration_s']:.0f} s workload, TPOT "
                    f"SLO {res['slo_ms']:.1f} ms" + (f" ({how})" if how else "") +
                    (f"; {res['adapter_requests']} of {res['requests']} requests name an "
                     f"adapter" if res.get("adapter_share") else "") +
                    "; 95 % intervals from a block bootstrap", title_justify="left")
    for col in ("policy", "SLO per token", "finetune tok/s", "vs best static",
                "of best mix", "decision p99 us cpu"):
        t.add_column(col, justify="right")
    for p in res["policies"]:
        fig = v["policies"][p]
        mark = " (best static)" if p == v["best_static"] else ""
        ratio = _ci(v["ratio"], ".2f") if p == "harli" else "-"
        mix = _ci(v["fraction_of_best_mix"], ".2f") if p == "harli" else "-"
        cpu = res["decision_p99_us"].get(p, {}).get("decision_cpu_p99_us")
        t.add_row(p + mark, _ci(fig["attainment"], ".1f", True), _ci(fig["tok_s"], ".0f"),
                  ratio, mix, "-" if cpu is None else f"{cpu:.0f}")
    t.add_row("best mix", "-", _ci(v["best_mix_tok_s"], ".0f"), "-", "1", "-")
    console.print(t)
    if "harli" in res["policies"]:
        console.print(predictor_line(res))


def plot(res: dict[str, Any], path: Path) -> None:
    """One PNG: per policy its tokens' gaps in its blocks against the SLO (shared axes, the
    attainment written on each panel), the level over the run, and the pooled figures with
    their intervals."""
    plt = plotting.pyplot()

    v = res["verdict"]
    pols = list(v["policies"])
    colors = {p: f"C{i}" for i, p in enumerate(pols)}
    fig = plt.figure(figsize=(max(10.0, 2.6 * len(pols)), 8.5))
    grid = fig.add_gridspec(3, len(pols), height_ratios=[1.2, 0.8, 1.0])
    blocks = res["blocks"]
    series = sorted(res["tpot_series"])
    first = None
    for j, p in enumerate(pols):
        ax = fig.add_subplot(grid[0, j], sharey=first, sharex=first)
        first = first or ax
        mine = [(b["start_s"], b["end_s"]) for b in blocks if b["policy"] == p]
        pts = [(t, g) for t, g in series if any(s <= t < e for s, e in mine)]
        ax.scatter([t for t, _ in pts], [1000 * g for _, g in pts], s=1, alpha=0.4,
                   color=colors[p])
        ax.axhline(res["slo_ms"], color="red", lw=0.8, label="SLO")
        ax.set_yscale("log")
        ax.set_title(p, fontsize=9)
        ax.text(0.02, 0.95, f"within SLO {_ci(v['policies'][p]['attainment'], '.1f', True)}",
                transform=ax.transAxes, fontsize=7, va="top")
        ax.set_xlabel("s")
        if j == 0:
            ax.set_ylabel("gap before a token, ms")
            ax.legend(loc="lower right", fontsize=7)
    lv = fig.add_subplot(grid[1, :])
    for b in blocks:
        lv.axvspan(b["start_s"], b["end_s"], color=colors[b["policy"]], alpha=0.15, lw=0)
    s = res["level_samples"]
    lv.step([x["t"] for x in s], [x["level"] for x in s], where="post", color="black", lw=0.8,
            label="finetune level")
    lv.set_ylim(-0.2, res["levels"] + 0.2)
    lv.set_ylabel("level")
    lv.set_xlabel("s since the run began (shaded: whose block)")
    from matplotlib.patches import Patch

    lv.legend(handles=[Patch(color=colors[p], alpha=0.4, label=p) for p in pols],
              ncol=len(pols), fontsize=7, loc="upper right")
    for k, (key, label, scale) in enumerate((("attainment", "SLO per token, %", 100.0),
                                             ("tok_s", "finetune tok/s", 1.0))):
        ax = fig.add_subplot(grid[2, k * len(pols) // 2:(k + 1) * len(pols) // 2 or 1])
        vals = [v["policies"][p][key] for p in pols]
        xs = range(len(pols))
        ax.bar(xs, [scale * (e["value"] or 0) for e in vals],
               color=[colors[p] for p in pols], alpha=0.7)
        lo = [scale * ((e["value"] or 0) - (e["lo"] if e["lo"] is not None else e["value"] or 0))
              for e in vals]
        hi = [scale * ((e["hi"] if e["hi"] is not None else e["value"] or 0) - (e["value"] or 0))
              for e in vals]
        ax.errorbar(xs, [scale * (e["value"] or 0) for e in vals], yerr=[lo, hi], fmt="none",
                    ecolor="black", capsize=3, label="95 % interval")
        if key == "attainment":
            ax.axhline(100 * v["target"], color="red", lw=0.8, label="target")
            ax.set_ylim(max(0.0, 100 * min((e["lo"] or e["value"] or 1) for e in vals) - 2),
                        100.5)
        ax.set_xticks(list(xs), pols, rotation=30, fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def host_probe_ms(repeats: int = 5) -> float:
    """This host's speed now: the best of ``repeats`` timings of a fixed pure-Python loop
    (~10 ms), on the bench's own cores, before a round starts (the finetune paused). On a
    shared VM it moves by tens of percent within minutes; reported per round, it says how much
    of the spread between rounds is the host's (``docs/benchmarks.md`` calls it once a second
    to see the host drift with nothing of Harli's running)."""
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        s = 0
        for i in range(200_000):
            s += i * i
        best = min(best, time.perf_counter() - t)
    return 1000.0 * best


def cpu_times() -> tuple[float, float] | None:
    """(steal, total) CPU seconds of all CPUs (``psutil.cpu_times``), or None where the OS
    reports no steal (Linux does). Steal is time a hypervisor ran something else while this
    VM's vCPU wanted to run: the direct measure of the noisy neighbour that ``host_probe_ms``
    only infers."""
    import psutil

    t = psutil.cpu_times()
    steal = getattr(t, "steal", None)
    if steal is None:
        return None
    # Linux counts guest time inside user time already.
    return steal, sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def steal_pct(before: tuple[float, float] | None,
              after: tuple[float, float] | None) -> float | None:
    """The share of CPU time stolen by the hypervisor between two ``cpu_times``, in %."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


