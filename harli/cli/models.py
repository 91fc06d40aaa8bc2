"""``harli models`` and ``harli adapter add|rm``: the models the daemon serves, and the LoRA
adapters among them."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harli.cli.command import Command, add_endpoint_arguments, control_client


class ModelsCommand(Command):
    name = "models"
    help = "list the servable models: the base model and every registered adapter"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON, not a table")
        add_endpoint_arguments(p)

    def run(self, args: argparse.Namespace) -> int:
        from rich.console import Console
        from rich.table import Table

        from harli.client.control import to_jsonable

        with control_client(args) as c:
            models = c.models()
        if args.json:
            print(json.dumps([to_jsonable(m) for m in models]))
            return 0
        t = Table()
        for col in ("model", "kind", "source", "rank", "created", "state", "requests", "path"):
            t.add_column(col)
        for m in models:
            source = {"job": f"job {m.job_id}", "checkpoint": f"job {m.job_id} step {m.step}",
                      "path": "added", "model": "-"}.get(m.source, m.source)
            state = "base" if m.kind == "base" else "loaded" if m.loaded else "on disk"
            t.add_row(m.name, m.kind, source, "-" if m.rank is None else str(m.rank),
                      "-" if m.created_s is None else
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created_s)),
                      state, str(m.requests), m.path)
        Console().print(t)
        return 0


class AdapterCommand(Command):
    name = "adapter"
    help = "register (add) or unregister (rm) a LoRA adapter for serving"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="adapter_cmd", required=True)
        add = sub.add_parser("add", help="serve a PEFT LoRA adapter directory of the served "
                             "base model under NAME, at once")
        add.add_argument("name", help="the model name requests will use")
        add.add_argument("path", type=Path, help="the adapter directory (adapter_config.json "
                         "and adapter_model.safetensors)")
        rm = sub.add_parser("rm", help="stop serving an adapter (its files are kept)")
        rm.add_argument("name", help="the adapter's model name (harli models lists them)")
        rm.add_argument("--force", action="store_true",
                        help="also when requests use it: they end with finish_reason "
                        "adapter_removed")
        for sp in (add, rm):
            sp.add_argument("--json", action="store_true", help="print JSON")
            add_endpoint_arguments(sp)

    def run(self, args: argparse.Namespace) -> int:
        from harli.client.control import to_jsonable

        # A refusal (bad adapter, name taken, in use) propagates: main prints it, exit 1.
        with control_client(args) as c:
            if args.adapter_cmd == "add":
                m = c.add_adapter(args.name, str(args.path.expanduser().absolute()))
                verb = "serving"
            else:
                m = c.remove_adapter(args.name, force=args.force)
                verb = "removed"
        print(json.dumps(to_jsonable(m)) if args.json else
              f"{verb} adapter {m.name} (rank {m.rank}, {m.path})")
        return 0
