"""``harli bench``: every quota policy against the same seeded, changing inference load while a
LoRA job trains, in one run: TPOT against the SLO and finetune throughput, side by side.

One daemon serves the whole run (the real decode and finetune processes); before each policy's
turn the bench switches the policy through the control API and replays the identical workload
(Poisson arrivals in quiet, busy and bursty phases; see ``harli.bench.workload``). TPOT is
counted from the engine's per-token times that the inference client receives; finetune
throughput from the job's trained-token count over the turn. The best static level is the
highest ``static:L`` whose per-token attainment meets the target.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import os
import random
import shutil
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harli.bench import plotting
from harli.datasets import SAMPLE_DATASET


async def _replay(endpoint: str, requests: list[Any], seed: int) -> list[dict[str, Any]]:
    """Send each request at its arrival time; return per request its token times."""
    from harli.client.inference import AsyncInferenceClient, RequestError

    rng = random.Random(seed)
    prompts = [[rng.randrange(10, 500) for _ in range(r.prompt_len)] for r in requests]
    out: list[dict[str, Any]] = []
    async with AsyncInferenceClient(endpoint, timeout_s=600) as client:
        t0 = time.monotonic()

        async def one(i: int) -> None:
            r = requests[i]
            await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.monotonic()))
            times: list[float] = []
            try:
                async for chunk in client.generate(prompts[i], max_tokens=r.output_len,
                                                   temperature=0.0, ignore_eos=True):
                    times.extend(chunk.token_times_s)
            except RequestError as e:
                out.append({"i": i, "error": str(e), "times": times, "phase": r.phase})
                return
            out.append({"i": i, "times": times, "phase": r.phase})

        await asyncio.gather(*(one(i) for i in range(len(requests))))
    return out


def _slo_counts(results: list[dict[str, Any]], slo_s: float) -> dict[str, Any]:
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    per_req = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1)
               for r in results if len(r["times"]) >= 2]
    q = statistics.quantiles(gaps, n=100) if len(gaps) >= 2 else [0.0] * 99
    return {
        "tokens": len(gaps) + len(results), "requests": len(results),
        "errors": sum(1 for r in results if "error" in r),
        "tpot_p50_ms": 1000 * statistics.median(gaps) if gaps else None,
        "tpot_p99_ms": 1000 * q[98] if gaps else None,
        "attainment_token": sum(1 for g in gaps if g <= slo_s) / len(gaps) if gaps else None,
        "attainment_request": sum(1 for t in per_req if t <= slo_s) / len(per_req)
        if per_req else None,
    }


def _tpot_series(results: list[dict[str, Any]], t0_wall_s: float) -> list[tuple[float, float]]:
    """(seconds since the turn began, gap before this token) for every token. The engine
    stamps tokens in wall-clock time, so the turn's start is taken in it too: the plot puts
    this series over the level samples, which count from the same instant."""
    return [(b - t0_wall_s, b - a) for r in results
            for a, b in zip(r["times"], r["times"][1:], strict=False)]


def token_median_batch(results: list[dict[str, Any]]) -> float:
    """The batch the median token was decoded in: for every token, how many requests were
    between their first and last token at that moment."""
    spans = sorted((r["times"][0], r["times"][-1]) for r in results if len(r["times"]) >= 2)
    if not spans:
        return 1.0
    starts = [s for s, _ in spans]
    ends = sorted(e for _, e in spans)
    live = []
    for r in results:
        for t in r["times"][1:]:
            live.append(bisect.bisect_right(starts, t) - bisect.bisect_left(ends, t))
    return float(statistics.median(live)) if live else 1.0


def _sampler(ctl: Any, job_id: int, samples: list[dict[str, float | None]],
             stop: threading.Event, t0: float) -> None:
    while not stop.is_set():
        st = ctl.status()
        job = ctl.show(job_id).job
        q = st.scheduler.bound_quantile if st.scheduler is not None else None
        samples.append({"t": time.monotonic() - t0, "level": st.level, "tokens": job.tokens,
                        "bound_quantile": q,
                        "groups_lent": st.memory.groups_lent if st.memory else None})
        stop.wait(0.25)


def _measure_solo_tpot(endpoint: str, batch: int, seconds: float, prompt_len: int,
                       output_len: int) -> float:
    """Median engine TPOT of ``batch`` concurrent requests of the workload's median shape
    (its median prompt and output lengths), in waves for ``seconds``, the finetune paused."""
    from harli.bench.workload import Request

    gaps: list[float] = []
    t_end = time.monotonic() + seconds
    wave = 0
    while time.monotonic() < t_end or not gaps:
        wave += 1
        reqs = [Request(arrival_s=0.0, prompt_len=prompt_len, output_len=output_len,
                        phase="solo") for _ in range(max(1, batch))]
        res = asyncio.run(_replay(endpoint, reqs, 99 + wave))
        gaps += [b - a for r in res for a, b in zip(r["times"], r["times"][1:], strict=False)]
    return float(statistics.median(gaps))


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
    """The policies a bench runs unless told: decode alone, the top level always, every static
    level, then harli (whose online predictor has by then seen every level)."""
    return ["decode-only", "naive", *[f"static:{lv}" for lv in range(1, levels + 1)], "harli"]


def run_bench(base_dir: Path, duration_s: float, policies: list[str], slo_ms: float | None,
              seed: int, rate_scale: float, profile: Path | None,
              extra: list[str] | None = None, progress: Any = None,
              max_batched_tokens: int = 32, rounds: int = 2,
              workload: str = "decode", solo_s: float = 6.0) -> dict[str, Any]:
    from harli.bench.local_daemon import LocalDaemon
    from harli.bench.workload import default_spec, generate
    from harli.client.control import ControlClient
    from harli.ipc.jobs import JobSpec
    from harli.runtime import decode_cores

    # Chunked prefill with a small token budget per iteration (Sarathi-style), as any TPOT
    # SLO deployment runs: one long prompt then costs several short iterations, not one long
    # one that stalls every stream (measured with the tiny model: a 256-token chunk costs
    # ~18 ms on top of a ~5 ms decode iteration, a 32-token one ~2 ms).
    overrides = ['model.dtype="float32"', "decode.max_num_seqs=32",
                 f"decode.max_num_batched_tokens={max_batched_tokens}",
                 'scheduler.policy="decode-only"',
                 *([f'predictor.profile="{profile}"'] if profile else []), *(extra or [])]
    spec = default_spec(duration_s, seed, rate_scale, workload)
    res_spec = {"kind": workload, "phases": [vars(p) for p in spec.phases],
                "prompt": vars(spec.prompt),
                "output": vars(spec.output), "max_batched_tokens": max_batched_tokens}
    requests = generate(spec)
    res: dict[str, Any] = {"duration_s": duration_s, "seed": seed, "rate_scale": rate_scale,
                           "rounds": rounds,
                           "requests": len(requests), "policies": {},
                           "arrivals_s": [r.arrival_s for r in requests],
                           "profile": str(profile) if profile else None, "workload": res_spec}
    # The daemon's and the job's dirs are the bench's scratch, fresh every run: a job left by
    # an earlier run (`make run` reuses .harli/demo) would resume ahead of ours, and attaching
    # another one named "bench" is refused.
    for scratch in ("daemon", "job"):
        shutil.rmtree(base_dir / scratch, ignore_errors=True)
    bench_t0 = time.monotonic()
    daemon = LocalDaemon(base_dir / "daemon", overrides)
    # The daemon starts first: it pins decode from the host's whole mask.
    with daemon, ControlClient(daemon.cfg.control_endpoint) as ctl, \
            _off_cores(decode_cores(daemon.cfg.decode.cpu_cores, daemon.cfg.decode.cpu_threads)):
        levels = daemon.cfg.finetune.levels
        if slo_ms is None:
            # --slo auto: 1.5x the solo median TPOT at the workload's median batch. The batch
            # is measured, not guessed: the workload replayed with the finetune paused, and
            # the median over its tokens of how many requests were streaming at that token.
            ctl.set_policy("decode-only")
            warm = asyncio.run(_replay(daemon.endpoint, requests, seed * 1000))
            batch = max(1, round(token_median_batch(warm)))
            solo_tpot_s = _measure_solo_tpot(daemon.endpoint, batch, solo_s, spec.prompt.median,
                                             spec.output.median)
            slo_ms = 1.5 * 1000 * solo_tpot_s
            res["slo_auto"] = {"median_batch": batch, "solo_tpot_ms": 1000 * solo_tpot_s,
                               "solo_s": solo_s}
        res["slo_ms"] = slo_ms
        job = ctl.attach(JobSpec(name="bench", dataset=str(SAMPLE_DATASET),
                                 max_seq_len=128,
                                 micro_batch_size=8, learning_rate=1e-4,
                                 lr_schedule="constant", max_steps=10_000_000,
                                 checkpoint_every=10_000_000))
        # The daemon counts the SLO from the same token times; a restart resets nothing we use.
        ctl_sampler = ControlClient(daemon.cfg.control_endpoint)
        try:
            # Rounds in alternating order (A B C, C B A, ...): this host drifts by tens of
            # percent over minutes, and a policy always measured last would carry it alone.
            runs: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
            turn = 0
            for rnd in range(rounds):
                for policy in policies if rnd % 2 == 0 else list(reversed(policies)):
                    turn += 1
                    if progress is not None:
                        progress(f"round {rnd + 1}/{rounds}, {policy}: {len(requests)} "
                                 f"requests over {duration_s:.0f} s")
                    runs[policy].append(_turn(daemon, ctl, ctl_sampler, job.job_id, policy,
                                              slo_ms, requests, seed * 1000 + turn,
                                              spec.duration_s))
            for policy, done in runs.items():
                results = [r for one in done for r in one["results"]]
                wall = sum(one["wall_s"] for one in done)
                tokens = sum(one["tokens"] for one in done)
                res["policies"][policy] = {
                    **_slo_counts(results, slo_ms / 1000), "wall_s": wall,
                    "finetune_tokens": tokens, "finetune_tok_s": tokens / wall,
                    "decision_p99_us": max((one["decision_p99_us"] or 0.0) for one in done),
                    "decision_cpu_p99_us": max((one["decision_cpu_p99_us"] or 0.0)
                                               for one in done),
                    "rounds": [_round_summary(one, slo_ms, bench_t0) for one in done],
                    "busy_rates_tok_s": done[-1]["busy_rates_tok_s"],
                    "levels": done[0]["samples"],
                    "tpot_series": _tpot_series(done[0]["results"], done[0]["t0_wall_s"]),
                }
        finally:
            ctl_sampler.close()
            ctl.cancel(job.job_id)
    _compare(res)
    res["levels"] = levels
    return res


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


def _round_summary(one: dict[str, Any], slo_ms: float, bench_t0: float) -> dict[str, Any]:
    c = _slo_counts(one["results"], slo_ms / 1000)
    return {"start_s": one["t0"] - bench_t0, "attainment_token": c["attainment_token"],
            "tpot_p50_ms": c["tpot_p50_ms"], "tpot_p99_ms": c["tpot_p99_ms"],
            "wall_s": one["wall_s"], "finetune_tok_s": one["tokens"] / one["wall_s"],
            "host_probe_ms": one["host_probe_ms"],
            "host_steal_pct": one["host_steal_pct"],
            "reclaims": one["reclaims"], "preemptions": one["preemptions"],
            "scrubs": one["scrubs"],
            "groups_lent_max": max((s["groups_lent"] or 0 for s in one["samples"]), default=0),
            # How often each level was in force, sampled every 0.25 s (the full samples are
            # kept for the first round only, for the plot).
            "level_samples": {str(lv): n for lv, n in sorted(
                Counter(sample["level"] for sample in one["samples"]).items())},
            # Every decision of the turn, by the reason's first word and the level it gave.
            "decisions_by_reason": {kind: {str(lv): n for lv, n in sorted(by.items())}
                                    for kind, by in sorted(one["decisions_by_reason"].items())}}


def _turn(daemon: Any, ctl: Any, ctl_sampler: Any, job_id: int, policy: str, slo_ms: float,
          requests: list[Any], token_seed: int, duration_s: float) -> dict[str, Any]:
    """One policy's turn: switch, replay the workload, count. The turn lasts the workload's
    ``duration_s`` at least: a quiet tail with no arrivals is part of the load (the finetune
    trains through it), not time to cut."""
    # The host's speed before the round, the finetune paused and decode idle: what the probe
    # then measures is the host's own drift, not ours.
    ctl.set_policy("decode-only")
    time.sleep(0.3)  # a pause takes effect within a chunk of the finetune's micro-step
    probe_ms = host_probe_ms()
    ctl.set_policy(policy, tpot_slo_ms=slo_ms)
    time.sleep(1.0)  # the new level reaches the finetune
    before = ctl.show(job_id).job.tokens
    mem0 = _memory_counts(ctl.status())
    samples: list[dict[str, float | None]] = []
    stop = threading.Event()
    cpu0 = cpu_times()
    t0_wall_s = time.time()  # the engine's token stamps are wall-clock
    t0 = time.monotonic()
    th = threading.Thread(target=_sampler, args=(ctl_sampler, job_id, samples, stop, t0),
                          daemon=True)
    th.start()
    # Same arrivals and lengths every turn, fresh token ids: a replayed prompt would hit
    # vLLM's prefix cache and make later turns cheaper.
    results = asyncio.run(_replay(daemon.endpoint, requests, token_seed))
    time.sleep(max(0.0, t0 + duration_s - time.monotonic()))
    wall = time.monotonic() - t0
    stolen = steal_pct(cpu0, cpu_times())
    stop.set()
    th.join()
    end = ctl.status()
    sched = end.scheduler  # decision times since this turn's set_policy
    return {"results": results, "wall_s": wall, "samples": samples, "t0": t0,
            "t0_wall_s": t0_wall_s,
            "host_probe_ms": probe_ms, "host_steal_pct": stolen,
            "tokens": ctl.show(job_id).job.tokens - before,
            # KV lending's events in the turn: a reclaim or a preemption is decode-side work
            # that no policy chooses, so a round's misses can be checked against them.
            **{k: v - mem0[k] for k, v in _memory_counts(end).items()},
            "decision_p99_us": sched.decision_p99_us if sched else None,
            "decision_cpu_p99_us": sched.decision_cpu_p99_us if sched else None,
            # The daemon's measured finetune rates beside a busy decode (all turns so far).
            "busy_rates_tok_s": dict(sched.busy_rates_tok_s) if sched else {},
            "decisions_by_reason": dict(sched.decisions_by_reason) if sched else {}}


def _memory_counts(status: Any) -> dict[str, int]:
    """The daemon's reclaims (all outcomes), preemptions and decode-side scrubs so far, from
    one ``DaemonStatus``."""
    m = status.memory
    if m is None:
        return {"reclaims": 0, "preemptions": 0, "scrubs": 0}
    return {"reclaims": sum(m.reclaims.values()), "preemptions": m.preemptions,
            "scrubs": m.scrubs}


def _compare(res: dict[str, Any]) -> None:
    pols = res["policies"]
    statics = [(p, r) for p, r in pols.items() if p.startswith("static:")]
    ok = [(p, r) for p, r in statics if (r["attainment_token"] or 0) >= 0.99]
    best = max(ok, key=lambda pr: pr[1]["finetune_tok_s"]) if ok else None
    res["best_static"] = best[0] if best else None
    for r in pols.values():
        r["ratio_to_best_static"] = (r["finetune_tok_s"] / best[1]["finetune_tok_s"]
                                     if best and best[1]["finetune_tok_s"] else None)


# Host speed spread between rounds beyond which the verdict says the host, not the policy,
# may decide the figures (the SLO is 1.5x a solo TPOT).
HOST_DRIFT_WARN = 1.2
# Steal in a turn from which the verdict names it (a quiet VM here shows ~1 %).
HOST_STEAL_WARN_PCT = 5.0


def verdict(res: dict[str, Any]) -> str:
    """The table's point in one sentence, from its own figures."""
    pols = res["policies"]
    target = 0.99
    parts = []
    h, solo = pols.get("harli"), pols.get("decode-only")
    if h is not None:
        parts.append(f"harli kept {h['attainment_token']:.1%} of tokens within the "
                     f"{res['slo_ms']:.1f} ms SLO" +
                     (f" (decode alone: {solo['attainment_token']:.1%})" if solo else ""))
        best = res.get("best_static")
        if best:
            parts.append(f"and trained {h['ratio_to_best_static'] or 0:.2f}x the tokens/s of "
                         f"{best}, the best static level meeting {target:.0%}")
        else:
            parts.append(f"no static level met {target:.0%} per token, so there is no "
                         f"ratio to report")
    n = pols.get("naive")
    if n is not None and solo is not None:
        parts.append(f"; naive (always the top level): {n['attainment_token']:.1%}")
    probes = [r["host_probe_ms"] for p in pols.values() for r in p.get("rounds", ())
              if r.get("host_probe_ms")]
    if probes and max(probes) > HOST_DRIFT_WARN * min(probes):
        parts.append(f"; the host's own speed moved {max(probes) / min(probes):.2f}x between "
                     f"rounds (probe {min(probes):.1f}-{max(probes):.1f} ms), more than any "
                     f"policy effect here")
    steals = [r["host_steal_pct"] for p in pols.values() for r in p.get("rounds", ())
              if r.get("host_steal_pct") is not None]
    if steals and max(steals) >= HOST_STEAL_WARN_PCT:
        parts.append(f"; the hypervisor took up to {max(steals):.0f} % of this VM's CPU time in "
                     f"a turn (steal, /proc/stat; median {statistics.median(steals):.0f} %)")
    return " ".join(parts)


def print_table(res: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"harli bench: {res['requests']} requests over {res['duration_s']:.0f} s, "
                    f"{res['rounds']} rounds per policy, TPOT SLO {res['slo_ms']:.1f} ms, a "
                    f"LoRA job training")
    for col in ("policy", "TPOT p50 ms", "TPOT p99 ms", "SLO per token", "SLO per request",
                "finetune tok/s", "vs best static", "decision p99 us cpu/wall"):
        t.add_column(col, justify="right")

    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for p, r in res["policies"].items():
        mark = " (best static)" if p == res.get("best_static") else ""
        t.add_row(p + mark, f(r["tpot_p50_ms"], ".1f"), f(r["tpot_p99_ms"], ".1f"),
                  f(r["attainment_token"], ".1%"), f(r["attainment_request"], ".1%"),
                  f(r["finetune_tok_s"], ".0f"), f(r["ratio_to_best_static"], ".2f") + "x"
                  if r["ratio_to_best_static"] else "-",
                  f"{f(r['decision_cpu_p99_us'], '.0f')}/{f(r['decision_p99_us'], '.0f')}")
    console.print(t)


def plot(res: dict[str, Any], path: Path) -> None:
    plt = plotting.pyplot()

    pols = list(res["policies"])
    fig, axes = plt.subplots(2, len(pols), figsize=(3.2 * len(pols), 5.5), sharex=True,
                             squeeze=False)
    for j, p in enumerate(pols):
        r = res["policies"][p]
        ax = axes[0][j]
        ts = r["tpot_series"]
        ax.scatter([t for t, _ in ts], [g * 1000 for _, g in ts], s=1, alpha=0.4)
        ax.axhline(res["slo_ms"], color="red", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(p, fontsize=9)
        if j == 0:
            ax.set_ylabel("TPOT (ms), SLO red")
        ax2 = axes[1][j]
        lv = r["levels"]
        ax2.step([s["t"] for s in lv], [s["level"] for s in lv], where="post", color="C1")
        ax2.set_ylim(-0.2, res["levels"] + 0.2)
        ax2.set_xlabel("s")
        if j == 0:
            ax2.set_ylabel("finetune level")
        tw = ax2.twinx()
        tok = [(a["t"], (b["tokens"] - a["tokens"]) / max(1e-6, b["t"] - a["t"]))
               for a, b in zip(lv, lv[4:], strict=False)]
        tw.plot([t for t, _ in tok], [v for _, v in tok], color="C2", lw=0.8)
        if j == len(pols) - 1:
            tw.set_ylabel("finetune tok/s (green)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
