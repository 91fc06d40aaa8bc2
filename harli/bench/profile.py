"""The measuring behind ``harli profile``: decode iteration latency through the real processes,
the fit of the two-stage predictor on it, and a profile's score on held-out configurations.

It starts the same daemon that serves (a ``LocalDaemon`` with the given config), drives it with
batches of a chosen size and prompt length through the inference client, and reads every
iteration's ``IterationTelemetry`` from decode_proc's telemetry socket: the batch vLLM actually
scheduled and the iteration's wall time. Stage 1 sweeps batch size x context with the finetune
idle; stage 2 repeats a subset while a representative LoRA job trains at each quota level (set
through the control API). With LoRA serving on, both stages also measure batches whose requests
name adapters (random PEFT adapters registered for the run: one for all requests, four
distinct, or half the batch on the base model), since any adapter in a batch puts all of it on
vLLM's slower LoRA path. Configurations run in a shuffled order, each ``repeats`` times, and
the levels in interleaved blocks (``level_blocks``), so that this VM's slow drift (+-25 % over
seconds) spreads over all configurations and levels instead of biasing a few.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harli.bench import plotting
from harli.datasets import SAMPLE_DATASET

_MAX_TOKENS = 32  # decode iterations per configuration and repeat
# A configuration's median is compared only over at least this many iterations (a prefill of
# one request is one iteration per run); the rest still count in the share under the bound.
MIN_CONFIG_ITERATIONS = 5


# Which requests of a batch name an adapter (``harli.bench.lora.models_of``'s mixes).
_MIX_SUFFIX = {"base": "", "1 adapter": "-a1", "4 adapters": "-a4", "half base": "-half"}
ADAPTERS = 4  # registered for a profiling run with LoRA serving on


@dataclass(frozen=True)
class Config:
    batch: int
    context: int
    level: int
    mix: str = "base"

    def __post_init__(self) -> None:
        if self.mix not in _MIX_SUFFIX:
            raise ValueError(f"unknown mix {self.mix!r}; one of {', '.join(_MIX_SUFFIX)}")

    @property
    def name(self) -> str:
        return f"b{self.batch}-c{self.context}-l{self.level}{_MIX_SUFFIX[self.mix]}"


def grid(quick: bool, levels: int, held_out: bool = False,
         adapters: bool = False) -> list[Config]:
    """Fit grid (stage 1 all shapes at level 0, stage 2 a subset at each level), or the
    held-out grid: shapes never in the fit. ``adapters``: also batches naming adapters (the
    held-out ones in a mix the fit never saw, half the batch on the base model)."""
    if held_out:
        s1 = [(b, c) for b in (3, 12, 24) for c in (128, 1024)]
        s2 = [(b, c) for b in (3, 24) for c in (384,)]
        a1 = [(b, c, "half base" if b > 3 else "4 adapters") for b in (3, 12, 24)
              for c in (128, 1024)]
        a2 = [(24, 384, "half base")]
    elif quick:
        s1 = [(b, c) for b in (1, 4, 16, 32) for c in (16, 512, 1536)]
        s2 = [(b, c) for b in (1, 16) for c in (256, 1536)]
        a1 = [(b, c, "1 adapter" if b < 16 else "4 adapters") for b in (1, 4, 16, 32)
              for c in (16, 1536)]
        a2 = [(16, 256, "1 adapter")]
    else:
        s1 = [(b, c) for b in (1, 2, 4, 8, 16, 32) for c in (16, 256, 768, 1536)]
        s2 = [(b, c) for b in (1, 8, 32) for c in (16, 768, 1536)]
        a1 = [(b, c, "1 adapter" if b < 8 else "4 adapters") for b in (1, 4, 8, 16, 32)
              for c in (16, 768, 1536)]
        a2 = [(8, 768, "4 adapters"), (32, 16, "1 adapter")]
    if not adapters:
        a1, a2 = [], []
    return ([Config(b, c, 0) for b, c in s1] + [Config(b, c, 0, m) for b, c, m in a1]
            + [Config(b, c, lv) for lv in range(1, levels + 1) for b, c in s2]
            + [Config(b, c, lv, m) for lv in range(1, levels + 1) for b, c, m in a2])


class Profiler:
    """Drives one daemon and collects the telemetry of the iterations each batch produced."""

    def __init__(self, daemon: Any, seed: int, adapters: list[str] | None = None) -> None:
        import zmq

        from harli.ipc.codec import Decoder
        from harli.ipc.decode import IterationTelemetry

        self.daemon = daemon
        self.adapters = adapters or []
        self.rng = random.Random(seed)
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.RCVHWM, 1_000_000)
        self._sub.connect(daemon.cfg.internal_endpoint("telemetry"))
        self._decoder: Decoder[IterationTelemetry] = Decoder(IterationTelemetry)
        time.sleep(0.3)  # the SUB handshake, so no record of the first batch is lost

    def close(self) -> None:
        self._sub.close(linger=0)
        self._ctx.term()

    def _drain(self, wait_ms: int = 0) -> list[Any]:
        import zmq

        out: list[Any] = []
        if wait_ms and not self._sub.poll(wait_ms):
            return out
        while True:
            try:
                out.append(self._decoder.decode(self._sub.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return out

    async def _batch(self, cfg: Config) -> None:
        from harli.bench.lora import models_of
        from harli.client.inference import AsyncInferenceClient

        if cfg.mix != "base" and len(self.adapters) < ADAPTERS:
            raise ValueError(f"{cfg.name}: batches with adapters need LoRA serving on "
                             f"(lora.enabled) and {ADAPTERS} adapters registered")
        prompts = [[self.rng.randrange(10, 500) for _ in range(cfg.context)]
                   for _ in range(cfg.batch)]
        models = models_of(cfg.mix, cfg.batch, self.adapters)
        async with AsyncInferenceClient(self.daemon.endpoint, timeout_s=300) as client:
            await asyncio.gather(*(client.complete(p, max_tokens=_MAX_TOKENS, temperature=0.0,
                                                   ignore_eos=True, model=m)
                                   for p, m in zip(prompts, models, strict=True)))

    def measure(self, cfg: Config) -> list[Any]:
        """One batch of ``cfg``; returns a ``Sample`` per iteration it ran."""
        from harli.predictor import BatchShape, Sample, token_latency_s

        self._drain()
        asyncio.run(self._batch(cfg))
        records = self._drain(200)
        records += self._drain(50)
        samples = []
        prev = None
        for t in sorted(records, key=lambda r: (r.incarnation, r.iteration)):
            shape = BatchShape.from_telemetry(t)
            latency_s = token_latency_s(t, prev)
            prev = t
            # Requests join over the first iterations (chunked prefill) and leave together:
            # "decode" is the steady batch of all of them; the ramp is its own configuration.
            phase = ("prefill" if t.prefill_tokens else
                     "decode" if t.num_running == cfg.batch else "ramp")
            samples.append(Sample(shape=shape, level=cfg.level, latency_s=latency_s,
                                  config=f"{cfg.name}-{phase}"))
        return samples


def _set_level(ctl: Any, level: int, job_id: int | None) -> None:
    """Set the quota level and wait until a micro-step ran at it (stage 2 measures the
    finetune actually running, not a decision in flight)."""
    ctl.set_level(level)
    if level == 0 or job_id is None:
        time.sleep(0.5)  # a micro-step in flight finishes
        return
    deadline = time.monotonic() + 60
    while ctl.show(job_id).job.level != level:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the finetune did not run at level {level} within 60 s")
        time.sleep(0.1)


@dataclass
class ProfilingRun:
    """The profiling daemon, its control client, the job training beside decode (None with
    the finetune off) and the adapters registered for batches that name them (none with LoRA
    serving off)."""

    daemon: Any
    ctl: Any
    job_id: int | None
    adapters: list[str]


@contextmanager
def profiling_daemon(base_dir: Path, overrides: list[str], config_file: Path | None,
                     seed: int = 0) -> Iterator[ProfilingRun]:
    from harli.bench.local_daemon import LocalDaemon
    from harli.bench.lora import register_adapters
    from harli.client.control import ControlClient
    from harli.ipc.jobs import JobSpec

    # Level 0 until we say: the job is attached but paused while stage 1 runs.
    daemon = LocalDaemon(base_dir / "daemon", ["finetune.level=0",
                                               'scheduler.policy="static:0"', *overrides],
                         config_file=config_file)
    with daemon, ControlClient(daemon.cfg.control_endpoint) as ctl:
        job_id = None
        if daemon.cfg.finetune.enabled:
            job = ctl.attach(JobSpec(name="profile", dataset=str(SAMPLE_DATASET),
                                     max_seq_len=128,
                                     micro_batch_size=8, learning_rate=1e-4,
                                     lr_schedule="constant", max_steps=1_000_000,
                                     checkpoint_every=1_000_000))
            job_id = job.job_id
        adapters = (register_adapters(daemon, ctl, base_dir, ADAPTERS, "profile", seed)
                    if daemon.cfg.lora.enabled else [])
        try:
            yield ProfilingRun(daemon, ctl, job_id, adapters)
        finally:
            if job_id is not None:
                ctl.cancel(job_id)


# The levels are interleaved in blocks: profiled first and alone, level 0 alone carries the
# host's slow stretches of those minutes (measured: level 0's 0.99 bound after the bias 2.0x
# its estimate, levels 1-4 1.4-1.5x; more stage-1 features did not change that). In blocks,
# every level samples the host alike; changing level costs a wait for a micro-step at the new
# one (~0.3 s), so a few blocks, not one per configuration.
LEVEL_BLOCKS = 4


def level_blocks(configs: list[Config], repeats: int, seed: int,
                 blocks: int = LEVEL_BLOCKS) -> list[tuple[int, list[Config]]]:
    """The order to measure ``configs`` (each ``repeats`` times) in: per level a shuffled
    list cut into ``blocks`` slices; block b runs every level's b-th slice, levels ascending
    in even blocks and descending in odd ones (the bench's alternating order)."""
    if blocks < 1 or repeats < 1:
        raise ValueError(f"blocks and repeats must be >= 1, got {blocks}, {repeats}")
    rng = random.Random(seed)
    by_level: dict[int, list[Config]] = {}
    for c in configs:
        by_level.setdefault(c.level, []).extend([c] * repeats)
    slices: dict[int, list[list[Config]]] = {}
    for level, todo in by_level.items():
        rng.shuffle(todo)
        n = min(blocks, len(todo))
        slices[level] = [todo[i * len(todo) // n:(i + 1) * len(todo) // n] for i in range(n)]
    order: list[tuple[int, list[Config]]] = []
    for b in range(blocks):
        levels = sorted(slices, reverse=b % 2 == 1)
        order += [(lv, slices[lv][b]) for lv in levels if b < len(slices[lv])]
    return order


def run_configs(run: ProfilingRun, configs: list[Config], repeats: int, seed: int,
                progress: Any = None) -> list[Any]:
    ctl, job_id = run.ctl, run.job_id
    prof = Profiler(run.daemon, seed, run.adapters)
    samples: list[Any] = []
    try:
        order = level_blocks(configs, repeats, seed)
        task = progress.add_task("profiling", total=sum(len(todo) for _, todo in order)) \
            if progress is not None else None
        prof.measure(Config(4, 64, 0))  # warm-up (first-touch, caches): not kept
        current = None
        for level, todo in order:
            if level != current:  # one block ends and the next starts at the same level
                _set_level(ctl, level, job_id)
                current = level
            for c in todo:
                if progress is not None:
                    progress.update(task, description=f"level {level}: batch {c.batch:>2} x "
                                    f"{c.context:>4} tokens of context, {c.mix}")
                samples.extend(prof.measure(c))
                if progress is not None:
                    progress.advance(task)
        _set_level(ctl, 0, job_id)
    finally:
        prof.close()
    return samples


def plot(report: Any, path: Path, title: str) -> None:
    plt = plotting.pyplot()

    fig, axes = plt.subplots(1, len(report.stages), figsize=(6 * len(report.stages), 5),
                             squeeze=False)
    for ax, (stage, rep) in zip(axes[0], report.stages.items(), strict=False):
        xs = [r.median_measured_s * 1000 for r in rep.rows]
        ys = [r.median_estimate_s * 1000 for r in rep.rows]
        levels = [r.level for r in rep.rows]
        sc = ax.scatter(xs, ys, c=levels, cmap="viridis", s=18)
        lo, hi = (min(xs + ys) * 0.8, max(xs + ys) * 1.25) if xs else (1.0, 10.0)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.plot([lo, hi], [lo * 1.1, hi * 1.1], ":", color="grey", lw=0.8)
        ax.plot([lo, hi], [lo * 0.9, hi * 0.9], ":", color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured median iteration (ms)")
        ax.set_ylabel("predicted median (ms)")
        ax.set_title(f"{stage}: mean APE {rep.mean_ape_pct:.1f} %, P95 {rep.p95_ape_pct:.1f} %, "
                     f"{rep.within_upper_share:.1%} under bound", fontsize=9)
        if stage.startswith("stage2"):
            fig.colorbar(sc, ax=ax, label="quota level")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_report(reports: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title="Held-out configurations: predicted vs measured medians")
    for col in ("predictor", "stage", "configs", "iterations", "mean APE", "P95 APE",
                "iterations <= upper"):
        t.add_column(col, justify="right")
    for name, report in reports.items():
        for stage, r in report.stages.items():
            t.add_row(name, stage, str(r.n_configs), str(r.n_samples), f"{r.mean_ape_pct:.1f} %",
                      f"{r.p95_ape_pct:.1f} %", f"{r.within_upper_share:.1%}")
    console.print(t)


def report_json(reports: dict[str, Any], samples: list[Any], elapsed_s: float) -> bytes:
    import msgspec

    return msgspec.json.encode({"elapsed_s": elapsed_s, "reports": reports, "samples": samples})


def refit_profile(profile: Any) -> Any:
    """``profile`` with both stages fit again on its stored iterations (after an upgrade of
    harli's fits), stamped with when; ValueError if it holds too few."""
    refitted = profile.refit()
    refitted.meta["refitted_s"] = round(time.time(), 1)
    return refitted


@dataclass
class Measurement:
    """What one profiling run measured: the daemon's profile key, the grid and its iterations."""

    key: Any  # ProfileKey
    configs: list[Config]
    samples: list[Any]  # Sample
    elapsed_s: float


def measure(base_dir: Path, overrides: list[str], config_file: Path | None, *, quick: bool,
            repeats: int, seed: int, console: Any, reference: Any = None,
            reference_name: str = "") -> Measurement:
    """Start a profiling daemon and measure the fit grid, or with a ``reference`` profile the
    held-out grid; ``ProfileError`` if ``reference`` was measured on another setup."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from harli.daemon.latency import profile_key
    from harli.predictor import ProfileError

    t0 = time.monotonic()
    with profiling_daemon(base_dir, overrides, config_file, seed) as run, \
            Progress(TextColumn("{task.description}"), BarColumn(),
                     TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                     console=console) as progress:
        key = profile_key(run.daemon.cfg)  # the key the daemon will check
        if reference is not None:
            bad = reference.mismatches(key)
            if bad:
                raise ProfileError(f"{reference_name} does not fit this daemon: "
                                   + "; ".join(bad))
        levels = run.daemon.cfg.finetune.levels if run.job_id is not None else 0
        configs = grid(quick, levels, held_out=reference is not None,
                       adapters=bool(run.adapters))
        samples = run_configs(run, configs, repeats, seed, progress)
    return Measurement(key=key, configs=configs, samples=samples,
                       elapsed_s=time.monotonic() - t0)


def new_profile(m: Measurement, quick: bool, repeats: int) -> Any:
    """The profile fitted on ``m`` (a ``Profile``)."""
    from harli.predictor import PROFILE_VERSION, Profile

    return Profile(version=PROFILE_VERSION, key=m.key, created_s=time.time(),
                   solo=None, samples=m.samples,
                   meta={"quick": quick, "repeats": repeats,
                         "elapsed_s": round(m.elapsed_s, 1),
                         "configs": len(m.configs)}).refit()


def evaluate_profile(profile: Any, m: Measurement) -> dict[str, Any]:
    """``profile`` scored on the held-out iterations of ``m``: as fitted, and as the daemon runs
    it (each iteration predicted, then fed back as a residual to the online correction; a
    prediction uses only iterations before it)."""
    from harli.predictor import evaluate

    return {"profile": evaluate(profile.model(), m.samples, MIN_CONFIG_ITERATIONS),
            "profile + online": evaluate(profile.model(), m.samples,
                                         MIN_CONFIG_ITERATIONS, online=True)}
