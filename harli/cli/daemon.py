"""``harli daemon``: run the supervising daemon in the foreground (systemd ``Type=notify``)."""

from __future__ import annotations

import argparse

from harli.cli.command import Command, add_config_arguments, load_config


class DaemonCommand(Command):
    name = "daemon"
    help = "run the daemon in the foreground"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_config_arguments(p)
        p.add_argument("--model", help="model directory (overrides model.path)")
        p.add_argument("--runtime-dir", help="sockets directory (overrides daemon.runtime_dir)")
        p.add_argument("--state-dir", help="state directory (overrides daemon.state_dir)")

    def run(self, args: argparse.Namespace) -> int:
        from harli.daemon.server import run_daemon

        extra = []
        for flag, key in (("model", "model.path"), ("runtime_dir", "daemon.runtime_dir"),
                          ("state_dir", "daemon.state_dir")):
            value = getattr(args, flag)
            if value:
                extra.append(f'{key}="{value}"')
        return run_daemon(load_config(args, extra))
