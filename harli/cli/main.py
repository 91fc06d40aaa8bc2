"""The ``harli`` console script: one sub-command per module under ``harli.cli``."""

from __future__ import annotations

import argparse
import os
import sys

from harli.cli.attach import AttachCommand
from harli.cli.bench import (
    BenchCommand,
    BenchHttpCommand,
    BenchLoraCommand,
    BenchMemoryCommand,
    BenchOverheadCommand,
    BenchValidationCommand,
)
from harli.cli.command import Command, CommandError
from harli.cli.daemon import DaemonCommand
from harli.cli.demo import DemoCommand
from harli.cli.generate import GenerateCommand
from harli.cli.gpu_check import GpuCheckCommand
from harli.cli.jobs import JobCommand, JobsCommand
from harli.cli.model import KeysCommand, ModelCommand
from harli.cli.models import AdapterCommand, ModelsCommand
from harli.cli.profile import ProfileCommand
from harli.cli.status import LevelCommand, PolicyCommand, StatusCommand

COMMANDS: list[Command] = [DaemonCommand(), GenerateCommand(), ModelCommand(),
                           AttachCommand(), JobsCommand(), JobCommand(), StatusCommand(),
                           LevelCommand(), PolicyCommand(), ProfileCommand(), BenchCommand(),
                           BenchOverheadCommand(), BenchMemoryCommand(), DemoCommand(),
                           KeysCommand(), GpuCheckCommand(), ModelsCommand(), AdapterCommand(),
                           BenchLoraCommand(), BenchHttpCommand(),
                           BenchValidationCommand()]


EXIT_USAGE = 2  # a user's mistake in arguments or config
EXIT_REFUSED = 1  # the daemon refused or failed a request, or did not answer in time
EXIT_NOT_RUNNING = 3  # no daemon listens on the local socket (known at once, no waiting)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
# The reader of stdout went away (``harli jobs | head -1``): silent, and 1 as Python's
# documentation recommends and rich's Console does for the commands that print through it.
EXIT_BROKEN_PIPE = 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("harli")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harli", description="Harli: decode serving + LoRA "
                                "finetuning on one accelerator, inside a TPOT SLO.",
                                epilog="exit codes: 0 ok, 1 the daemon refused a request or "
                                "did not answer in time (or stdout was closed), 2 a usage or "
                                "config error, 3 no daemon is running, 130 interrupted")
    p.add_argument("--version", action="version", version=f"harli {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(sp)
        sp.set_defaults(_cmd=cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    from harli.client.inference import RequestError
    from harli.ipc.endpoints import DaemonNotRunning

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    cmd: Command = args._cmd
    try:
        cmd.validate(args)
        return cmd.run(args)
    except CommandError as e:
        print(f"harli {cmd.name}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonNotRunning as e:
        print(f"harli {cmd.name}: {e}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except RequestError as e:
        print(f"harli {cmd.name}: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
