"""``harli gpu-check``: the arguments of ``harli.gpu_check.checks`` (which sections, levels,
model, MPS) and its exit code: 0 when every section passed, 1 when one failed, 2 without CUDA."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from harli.cli.command import Command, CommandError
from harli.gpu_check.checks import SECTIONS, CheckOptions, run_checks
from harli.gpu_check.report import write_report

logger = logging.getLogger(__name__)


class GpuCheckCommand(Command):
    name = "gpu-check"
    help = ("On a GPU host: check and measure MPS, CUDA IPC, green contexts, decode beside a "
            "trainer, the arena KV path and shared weights; writes a JSON report.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default="gpu-check.json", help="report file (JSON)")
        p.add_argument("--only", default=",".join(SECTIONS),
                       help=f"comma-separated sections to run (of {', '.join(SECTIONS)}); "
                            "the others are recorded as skipped")
        p.add_argument("--levels", type=int, default=4, help="quota levels (finetune.levels)")
        p.add_argument("--model", choices=["tiny", "small"], default="small",
                       help="Llama shape built in memory: tiny (harli's) or small (1.1B)")
        p.add_argument("--quick", action="store_true",
                       help="tiny model, fewer iterations: a smoke run of every check")
        p.add_argument("--mps", choices=["start", "off"], default="start",
                       help="start a private MPS control daemon for the checks after the "
                            "first (mps section), or run everything without MPS")
        p.add_argument("--timeout-s", type=float, default=600.0,
                       help="longest wait for one worker event")

    def validate(self, args: argparse.Namespace) -> None:
        unknown = [s for s in args.only.split(",") if s and s not in SECTIONS]
        if unknown:
            raise CommandError(f"--only: unknown sections {unknown}; choose from {SECTIONS}")
        if args.levels < 1:
            raise CommandError(f"--levels must be >= 1, got {args.levels}")

    def run(self, args: argparse.Namespace) -> int:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        opts = CheckOptions(out=Path(args.out), levels=args.levels, model=args.model,
                            quick=args.quick, mps=args.mps, timeout_s=args.timeout_s,
                            sections=tuple(s for s in args.only.split(",") if s))
        report = run_checks(opts)
        write_report(opts.out, report)
        if report.error:
            raise CommandError(f"{report.error} (report written to {opts.out})")
        for s in report.sections:
            logger.info("%-15s %-7s %s", s.name, s.status, s.reason.splitlines()[0]
                        if s.reason else "")
        logger.info("report written to %s", opts.out)
        return 0 if report.ok else 1
