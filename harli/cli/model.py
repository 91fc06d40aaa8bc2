"""``harli model init-tiny DIR [--seed N]``: write the generated tiny Llama model."""

from __future__ import annotations

import argparse

from harli.cli.command import Command, CommandError


class KeysCommand(Command):
    name = "keys"
    help = "write a CURVE key pair (for tcp:// endpoints)"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("dir", help="directory for the key files (created if missing)")
        p.add_argument("--name", default="server", help="file stem (default: server)")

    def run(self, args: argparse.Namespace) -> int:
        from harli.ipc.curve import create_keys

        public, secret = create_keys(args.dir, args.name)
        print(f"public: {public}\nsecret: {secret} (keep it private)")
        return 0


class ModelCommand(Command):
    name = "model"
    help = "model utilities (init-tiny)"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="model_cmd", required=True)
        tiny = sub.add_parser("init-tiny", help="write a tiny random Llama model + tokenizer")
        tiny.add_argument("dir", help="directory to write the model and tokenizer into")
        tiny.add_argument("--seed", type=int, default=0,
                          help="weight initialization seed (default: %(default)s)")

    def run(self, args: argparse.Namespace) -> int:
        import logging

        from harli.model.tiny import init_tiny, tree_digest

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            out = init_tiny(args.dir, args.seed)
        except FileExistsError as e:
            raise CommandError(str(e)) from None
        print(f"{out} sha256:{tree_digest(out)[:16]}")
        return 0
