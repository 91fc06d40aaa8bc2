"""The ``harli`` console script: one sub-command per module under ``harli.cli``."""

from __future__ import annotations

import argparse
import sys

from harli.cli.attach import AttachCommand
from harli.cli.bench import BenchCommand, BenchMemoryCommand, BenchOverheadCommand
from harli.cli.command import Command, CommandError
from harli.cli.daemon import DaemonCommand
from harli.cli.demo import DemoCommand
from harli.cli.generate import GenerateCommand
from harli.cli.gpu_check import GpuCheckCommand
from harli.cli.jobs import JobCommand, JobsCommand
from harli.cli.model import KeysCommand, ModelCommand
from harli.cli.profile import ProfileCommand
from harli.cli.status import LevelCommand, PolicyCommand, StatusCommand

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
