"""The ``harli`` console script: one sub-command per module under ``harli.tools``."""

from __future__ import annotations

import argparse
import sys

from harli.tools.attach_cmd import AttachCommand
from harli.tools.bench_cmd import BenchCommand
from harli.tools.bench_memory import BenchMemoryCommand
from harli.tools.bench_overhead import BenchOverheadCommand
from harli.tools.command import Command, CommandError
from harli.tools.daemon_cmd import DaemonCommand
from harli.tools.demo import DemoCommand
from harli.tools.generate_cmd import GenerateCommand
from harli.tools.gpu_check_cmd import GpuCheckCommand
from harli.tools.jobs_cmd import JobCommand, JobsCommand
from harli.tools.model_cmd import KeysCommand, ModelCommand
from harli.tools.profile_cmd import ProfileCommand
from harli.tools.status_cmd import LevelCommand, PolicyCommand, StatusCommand

COMMANDS: list[Command] = [DaemonCommand(), GenerateCommand(), ModelCommand(),
                           AttachCommand(), JobsCommand(), JobCommand(), StatusCommand(),
                           LevelCommand(), PolicyCommand(), ProfileCommand(), BenchCommand(),
                           BenchOverheadCommand(), BenchMemoryCommand(), DemoCommand(),
                           KeysCommand(), GpuCheckCommand()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harli", description="Harli: decode serving + LoRA "
                                "finetuning on one accelerator, inside a TPOT SLO.")
    sub = p.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS:
        sp = sub.add_parser(cmd.name, help=cmd.help)
        cmd.add_arguments(sp)
        sp.set_defaults(_cmd=cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd: Command = args._cmd
    try:
        cmd.validate(args)
        return cmd.run(args)
    except CommandError as e:
        print(f"harli {cmd.name}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
