"""``harli bench``, ``harli bench-memory`` and ``harli bench-overhead``: the arguments and
output files of the benchmarks in ``harli.bench``."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from harli.bench import bench, lora, memory, overhead, plotting
from harli.bench.workload import WORKLOAD_KINDS
from harli.cli.command import Command, CommandError


class BenchCommand(Command):
    name = "bench"
    help = "every quota policy against the same changing load, with a LoRA job training"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--quick", action="store_true",
                       help=f"the short form (under 2 minutes on a 2-core VM, daemon start "
                       f"included): --duration-s "
                       f"{bench.QUICK['duration_s']:g} --block-s {bench.QUICK['block_s']:g} "
                       f"--settle-s {bench.QUICK['settle_s']:g} --calib-s "
                       f"{bench.QUICK['calib_s']:g} (options given as well win)")
        d, q = bench.DEFAULTS, bench.QUICK
        p.add_argument("--duration-s", type=float, default=None,
                       help=f"length of the one workload the policies share, rounded to whole "
                       f"cycles (default: {d['duration_s']:g}; --quick: {q['duration_s']:g})")
        p.add_argument("--block-s", type=float, default=None,
                       help=f"one policy's turn in a cycle, seconds (default: "
                       f"{d['block_s']:g})")
        p.add_argument("--settle-s", type=float, default=None,
                       help=f"seconds after each switch left out of both sides' counts "
                       f"(default: {d['settle_s']:g})")
        p.add_argument("--slo", default="auto",
                       help=f"TPOT SLO in ms, or 'auto': {bench.SLO_MARGIN:g} x the gap decode "
                       f"alone keeps for {100 * bench.TARGET:g} %% of its tokens, measured "
                       f"first at the workload's load")
        p.add_argument("--calib-s", type=float, default=None,
                       help=f"--slo auto: seconds of decode alone it is measured over "
                       f"(default: {d['calib_s']:g})")
        p.add_argument("--policies", default="",
                       help="comma-separated (default: decode-only, static:1..K, harli); "
                       "each cycle runs them in a shuffled order")
        p.add_argument("--workload", choices=WORKLOAD_KINDS, default="decode",
                       help="decode: a decode instance of a disaggregated service (short "
                       "prompts stand in for the KV that arrives from prefill); mixed: "
                       "prefill and decode on one instance")
        p.add_argument("--rate-scale", type=float, default=1.0,
                       help="multiply every phase's arrival rate")
        p.add_argument("--adapter-share", type=float, default=0.0, metavar="FRACTION",
                       help="share of requests that name a LoRA adapter (random adapters "
                       "registered for the run; default: %(default)s, all on the base model)")
        p.add_argument("--profile", type=Path, help="latency profile for the harli policy")
        p.add_argument("--max-batched-tokens", type=int, default=32,
                       help="decode's per-iteration token budget (chunked prefill)")
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the workload and the prompts (default: %(default)s)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="config override for the daemon (repeatable)")
        p.add_argument("--out", type=Path, default=Path("bench.json"),
                       help="results JSON (default: %(default)s)")
        p.add_argument("--png", type=Path,
                       help="plot (default: beside --out; needs the plots extra)")
        p.add_argument("--dir", type=Path, help="working dir (default: a temporary one); its "
                       "daemon/ is replaced")

    def validate(self, args: argparse.Namespace) -> None:
        if args.slo != "auto":
            try:
                args.slo = float(args.slo)
            except ValueError:
                raise CommandError(f"--slo: a number of ms or 'auto', got {args.slo!r}") \
                    from None
            if args.slo <= 0:
                raise CommandError("--slo must be > 0")
        for key, value in (bench.QUICK if args.quick else bench.DEFAULTS).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        for key in ("duration_s", "block_s", "calib_s"):
            if getattr(args, key) <= 0:
                raise CommandError(f"--{key.replace('_', '-')} must be > 0")
        if not 0 <= args.settle_s < args.block_s:
            raise CommandError(f"--settle-s must be in [0, --block-s), got {args.settle_s}")
        # 0 is allowed: no arrivals, every turn the finetune beside an idle decode.
        if not args.rate_scale >= 0:
            raise CommandError(f"--rate-scale must be >= 0, got {args.rate_scale}")
        if not 0 <= args.adapter_share <= 1:
            raise CommandError(f"--adapter-share must be in [0, 1], got {args.adapter_share}")
        if args.rate_scale == 0 and args.slo == "auto":
            raise CommandError("--slo auto measures decode alone at the workload's load: with "
                               "--rate-scale 0 there is none; give --slo MS")
        # A misspelt policy fails here, not minutes in, when its turn comes.
        from harli.config import ConfigError, load
        from harli.scheduler.policy import check_policy

        try:
            cfg = load(None, list(args.set))
        except ConfigError as e:
            raise CommandError(str(e)) from None
        levels = cfg.finetune.levels
        if args.adapter_share and not cfg.lora.enabled:
            raise CommandError("--adapter-share needs LoRA serving on; drop "
                               "--set lora.enabled=false")
        args.policies = [p.strip() for p in args.policies.split(",") if p.strip()] or \
            bench.default_policies(levels)
        for policy in args.policies:
            try:
                check_policy(policy, levels)
            except ValueError as e:
                raise CommandError(f"--policies: {e}") from None

    def run(self, args: argparse.Namespace) -> int:
        from rich.console import Console

        console = Console()
        policies = args.policies  # validated, defaults filled in
        with tempfile.TemporaryDirectory(prefix="harli-bench-") as tmp:
            res = bench.run_bench(args.dir or Path(tmp), args.duration_s, policies,
                            None if args.slo == "auto" else args.slo, args.seed,
                            args.rate_scale, args.profile, args.set,
                            progress=lambda s: console.print(f"[dim]{s}"),
                            max_batched_tokens=args.max_batched_tokens,
                            workload=args.workload, block_s=args.block_s,
                            settle_s=args.settle_s, calib_s=args.calib_s,
                            adapter_share=args.adapter_share)
        bench.print_table(res, console)
        console.print(bench.verdict(res))
        args.out.write_text(json.dumps(res) + "\n")
        png = args.png or args.out.with_suffix(".png")
        try:
            bench.plot(res, png)
        except plotting.PlotsUnavailable as e:
            console.print(f"results: {args.out}; no plot: {e}")
            return 1 if args.png else 0  # a plot asked for by name and not drawn is a failure
        console.print(f"results: {args.out}; plot: {png}")
        return 0


class BenchMemoryCommand(Command):
    name = "bench-memory"
    help = "KV lending and reclaim under a quiet phase then a burst, with a LoRA job training"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--quiet-s", type=float, default=30.0,
                       help="seconds of the quiet phase, when KV is lent (default: %(default)s)")
        p.add_argument("--burst-s", type=float, default=120.0,
                       help="seconds of the burst that reclaims it (default: %(default)s)")
        p.add_argument("--burst-workers", type=int, default=32,
                       help="concurrent long streams in the burst")
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the streams' prompts (default: %(default)s)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="config override for the daemon")
        _add_out_and_dir(p)

    def run(self, args: argparse.Namespace) -> int:
        with tempfile.TemporaryDirectory(prefix="harli-bench-mem-") as tmp:
            res = memory.run_bench(args.dir or Path(tmp), args.quiet_s, args.burst_s,
                            args.burst_workers, args.seed, args.set)
        memory.print_table(res)
        _write_results(args.out, res)
        ok = (res["vllm_preemptions"] == 0 and res["greedy_ok"]
              and not res["burst"]["errors"] and not res["burst"]["incomplete"])
        return 0 if ok else 1


class BenchOverheadCommand(Command):
    name = "bench-overhead"
    help = "tokens/s through the daemon vs vLLM's offline LLM.generate, in one run"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--requests", type=int, default=32, help="concurrent requests (batch)")
        p.add_argument("--max-tokens", type=int, default=128,
                       help="tokens per request (default: %(default)s)")
        p.add_argument("--rounds", type=int, default=10,
                       help="alternating rounds of each side (default: %(default)s)")
        _add_out_and_dir(p)

    def run(self, args: argparse.Namespace) -> int:
        with tempfile.TemporaryDirectory(prefix="harli-bench-") as tmp:
            results = overhead.run_bench(args.dir or Path(tmp), args.requests, args.max_tokens,
                                args.rounds)
        overhead.print_table(results)
        _write_results(args.out, results)
        return 0


class BenchLoraCommand(Command):
    name = "bench-lora"
    help = "decode's TPOT and tokens/s with 0, 1 and 4 distinct LoRA adapters in the batch"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--batch", type=int, default=8,
                       help="concurrent requests in each round (default: %(default)s)")
        p.add_argument("--max-tokens", type=int, default=64,
                       help="tokens per request (default: %(default)s)")
        p.add_argument("--rounds", type=int, default=5,
                       help="rounds of every mix, interleaved (default: %(default)s)")
        p.add_argument("--rank", type=int, default=8,
                       help="the adapters' LoRA rank (default: %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
        _add_out_and_dir(p)

    def validate(self, args: argparse.Namespace) -> None:
        for key in ("batch", "max_tokens", "rounds", "rank"):
            if getattr(args, key) < 1:
                raise CommandError(f"--{key.replace('_', '-')} must be >= 1")
        if args.batch < 4:
            raise CommandError("--batch must be >= 4 (a round spreads over 4 adapters)")

    def run(self, args: argparse.Namespace) -> int:
        with tempfile.TemporaryDirectory(prefix="harli-bench-") as tmp:
            res = lora.run_bench(args.dir or Path(tmp), args.batch, args.max_tokens,
                                 args.rounds, args.rank, args.seed)
        lora.print_table(res)
        _write_results(args.out, res)
        return 0


class BenchHttpCommand(Command):
    name = "bench-http"
    help = ("Harli's OpenAI HTTP front against vllm serve under vllm bench serve, side by "
            "side; then the same load with a LoRA job training")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--rounds", type=int, default=3,
                       help="interleaved rounds of each server (default: %(default)s)")
        p.add_argument("--num-prompts", type=int, default=64,
                       help="requests per run (default: %(default)s)")
        p.add_argument("--request-rate", type=float, default=4.0,
                       help="Poisson arrivals per second (default: %(default)s)")
        p.add_argument("--input-len", type=int, default=32,
                       help="prompt tokens (default: %(default)s)")
        p.add_argument("--output-len", type=int, default=128,
                       help="output tokens (default: %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="config override for both servers' engine (repeatable)")
        _add_out_and_dir(p)

    def validate(self, args: argparse.Namespace) -> None:
        for key in ("rounds", "num_prompts", "input_len", "output_len"):
            if getattr(args, key) < 1:
                raise CommandError(f"--{key.replace('_', '-')} must be >= 1")
        if not args.request_rate > 0:
            raise CommandError(f"--request-rate must be > 0, got {args.request_rate}")

    def run(self, args: argparse.Namespace) -> int:
        from rich.console import Console

        from harli.bench import http_serving

        console = Console()
        with tempfile.TemporaryDirectory(prefix="harli-bench-") as tmp:
            res = http_serving.run_bench(args.dir or Path(tmp), args.rounds, args.num_prompts,
                                         args.request_rate, args.input_len, args.output_len,
                                         args.seed, list(args.set),
                                         say=lambda s: console.print(f"[dim]{s}"))
        http_serving.print_table(res, console)
        _write_results(args.out, res)
        return 0


class BenchValidationCommand(Command):
    name = "bench-validation"
    help = ("how fast a real daemon refuses large datasets with a bad last line (seconds, MB/s, "
            "RSS), its neighbours' latency meanwhile, and SIGTERM to exit mid-validation")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--sizes-mb", default="50,300,1024",
                       help="comma-separated file sizes in MB; 1024 = the 1 GiB default "
                       "finetune.max_dataset_bytes (default: %(default)s)")
        _add_out_and_dir(p)

    def validate(self, args: argparse.Namespace) -> None:
        try:
            sizes = tuple(int(x) for x in args.sizes_mb.split(","))
        except ValueError:
            raise CommandError(f"--sizes-mb {args.sizes_mb!r}: expected integers separated "
                               f"by commas") from None
        if not sizes or min(sizes) < 1:
            raise CommandError("--sizes-mb: each size must be >= 1")
        args.sizes = sizes

    def run(self, args: argparse.Namespace) -> int:
        from harli.bench import validation

        with tempfile.TemporaryDirectory(prefix="harli-bench-") as tmp:
            res = validation.run_bench(args.dir or Path(tmp), args.sizes)
        validation.print_table(res)
        _write_results(args.out, res)
        return 0


def _add_out_and_dir(p: argparse.ArgumentParser) -> None:
    """The results file and working dir options of the one-table benches."""
    p.add_argument("--out", type=Path, help="write the results JSON here")
    p.add_argument("--dir", type=Path, help="working dir (default: a temporary one)")


def _write_results(out: Path | None, res: dict[str, Any]) -> None:
    if out:
        out.write_text(json.dumps(res, indent=2) + "\n")

