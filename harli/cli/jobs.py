"""``harli jobs [--json]`` and ``harli job show|cancel|logs ID``: look at and steer jobs."""

from __future__ import annotations

import argparse
import json
import time

from harli.cli.command import Command, add_endpoint_arguments, control_client

_common = add_endpoint_arguments


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


class JobsCommand(Command):
    name = "jobs"
    help = "list finetune jobs"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON, not a table")
        _common(p)

    def run(self, args: argparse.Namespace) -> int:
        from rich.console import Console
        from rich.table import Table

        from harli.client.control import to_jsonable

        with control_client(args) as c:
            jobs = c.jobs()
        if args.json:
            print(json.dumps([to_jsonable(j) for j in jobs]))
            return 0
        t = Table()
        for col in ("id", "name", "status", "prio", "step", "loss", "tok/s", "level",
                    "paused s", "ckpt"):
            t.add_column(col)
        for j in jobs:
            t.add_row(str(j.job_id), j.name, j.status, str(j.priority),
                      f"{j.step}/{j.total_steps or '?'}", _fmt(j.loss),
                      _fmt(j.tokens_per_s, ".0f"), str(j.level if j.level is not None else "-"),
                      f"{j.paused_s:.1f}", str(j.checkpoint_step or "-"))
        Console().print(t)
        return 0


class JobCommand(Command):
    name = "job"
    help = "show, cancel or read the log of one job"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="job_cmd", required=True)
        for name, text in (("show", "status, progress and recent events"),
                           ("cancel", "cancel (a running job stops at its next micro-step)"),
                           ("logs", "the job's event log")):
            sp = sub.add_parser(name, help=text)
            sp.add_argument("job_id", type=int, help="the job's id (from harli attach or jobs)")
            sp.add_argument("--json", action="store_true", help="print JSON, not a table")
            if name == "logs":
                sp.add_argument("--follow", "-f", action="store_true",
                                help="keep printing new events until the job ends")
            _common(sp)

    def run(self, args: argparse.Namespace) -> int:
        from harli.client.control import to_jsonable

        # A refusal (no such job) propagates: main prints it in one line, exit 1.
        with control_client(args) as c:
            if args.job_cmd == "cancel":
                job = c.cancel(args.job_id)
                print(json.dumps(to_jsonable(job)) if args.json
                      else f"job {job.job_id}: {job.status}")
                return 0
            if args.job_cmd == "show":
                d = c.show(args.job_id)
                if args.json:
                    print(json.dumps(to_jsonable(d)))
                    return 0
                j = d.job
                print(f"job {j.job_id} {j.name}: {j.status}, step {j.step}/"
                      f"{j.total_steps or '?'}, epoch {j.epoch}, micro-steps "
                      f"{j.micro_steps}, tokens {j.tokens}, loss {_fmt(j.loss)} (first "
                      f"{_fmt(j.first_loss)}), level {j.level}, paused {j.paused_s:.1f} s, "
                      f"checkpoint {j.checkpoint_step}, restarts {j.restarts}")
                if j.adapter_path:
                    print(f"adapter: {j.adapter_path}")
                if j.fine_tuned_model:
                    print(f"served as model: {j.fine_tuned_model} (harli generate --model "
                          f"{j.fine_tuned_model})")
                if j.error:
                    print(f"error: {j.error}")
                for e in d.events:
                    print(f"  {time.strftime('%H:%M:%S', time.localtime(e.time_s))} "
                          f"{e.kind}: {e.message}")
                return 0
            after = 0
            while True:
                d = c.logs(args.job_id, after)
                for e in d.events:
                    print(json.dumps(to_jsonable(e)) if args.json else
                          f"{time.strftime('%H:%M:%S', time.localtime(e.time_s))} "
                          f"{e.kind}: {e.message}", flush=True)
                    after = e.event_id
                if not args.follow or d.job.status in ("succeeded", "failed",
                                                        "cancelled"):
                    return 0
                time.sleep(0.5)
