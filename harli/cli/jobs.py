"""``harli jobs [--json]`` and ``harli job show|cancel|pause|resume|logs|plot ID``: look at and
steer jobs (the HTTP API's fine-tuning jobs among them: one job store)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from harli.cli import job_log
from harli.cli.command import Command, CommandError, add_endpoint_arguments, control_client

_common = add_endpoint_arguments


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _status(job: Any) -> str:
    """The job's status; while its files are checked, how far that has come."""
    v = job.validation
    if job.status != "validating_files" or v is None or v.stage == "waiting" \
            or not v.bytes_total:
        return str(job.status)
    return f"{job.status} ({v.stage} {v.file} {100 * v.bytes_done / v.bytes_total:.0f} %)"


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
        for col in ("id", "name", "status", "prio", "step", "loss", "valid loss", "tok/s",
                    "level", "paused s", "ckpt"):
            t.add_column(col)
        for j in jobs:
            t.add_row(str(j.job_id), j.name, _status(j), str(j.priority),
                      f"{j.step}/{j.total_steps or '?'}", _fmt(j.loss), _fmt(j.valid_loss),
                      _fmt(j.tokens_per_s, ".0f"), str(j.level if j.level is not None else "-"),
                      f"{j.paused_s:.1f}", str(j.checkpoint_step or "-"))
        Console().print(t)
        return 0


class JobCommand(Command):
    name = "job"
    help = "show, cancel, pause, resume, read the log of, or plot the loss curve of one job"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        sub = p.add_subparsers(dest="job_cmd", required=True)
        for name, text in (("show", "status, progress, recent events; --json: all metrics"),
                           ("cancel", "cancel (a running job stops at its next micro-step)"),
                           ("pause", "hold it until resumed (a running job stops after a "
                                     "checkpoint at its next step boundary)"),
                           ("resume", "queue a held job again; it continues from its last "
                                      "checkpoint"),
                           ("logs", "the job's events and metric events, in time order"),
                           ("plot", "the job's loss curve as a PNG")):
            sp = sub.add_parser(name, help=text, description=text)
            sp.add_argument("job_id", type=int, help="the job's id (from harli attach or jobs)")
            if name == "plot":
                sp.add_argument("--out", type=Path, metavar="PNG",
                                help="where to write it (default: job-ID-loss.png)")
            else:
                sp.add_argument("--json", action="store_true",
                                help="print JSON" + (", one object a line" if name == "logs"
                                                     else ""))
            if name == "logs":
                sp.add_argument("--follow", "-f", action="store_true",
                                help="keep printing new entries until the job ends")
            _common(sp)

    def run(self, args: argparse.Namespace) -> int:
        from harli.client.control import to_jsonable

        # A refusal (no such job) propagates: main prints it in one line, exit 1.
        with control_client(args) as c:
            if args.job_cmd in ("cancel", "pause", "resume"):
                job = getattr(c, args.job_cmd)(args.job_id)
                print(json.dumps(to_jsonable(job)) if args.json
                      else f"job {job.job_id}: {job.status}"
                      + (" (pausing: stops after a checkpoint)"
                         if args.job_cmd == "pause" and job.status != "held" else ""))
                return 0
            if args.job_cmd == "show":
                return _show(c, args.job_id, args.json)
            if args.job_cmd == "plot":
                return _plot(c, args.job_id, args.out or Path(f"job-{args.job_id}-loss.png"))
            return _logs(c, args.job_id, args.json, args.follow)


def _show(c: Any, job_id: int, as_json: bool) -> int:
    from harli.client.control import to_jsonable

    d = c.show(job_id)
    if as_json:
        # show_job carries the newest metric events; the JSON has all of them.
        metrics = c.all_logs(job_id).metrics
        print(json.dumps(to_jsonable(msgspec.structs.replace(d, metrics=metrics))))
        return 0
    j = d.job
    print(f"job {j.job_id} {j.name}: {j.status}, step {j.step}/"
          f"{j.total_steps or '?'}, epoch {j.epoch}, micro-steps "
          f"{j.micro_steps}, tokens {j.tokens}, loss {_fmt(j.loss)} (first "
          f"{_fmt(j.first_loss)}), level {j.level}, paused {j.paused_s:.1f} s, "
          f"checkpoint {j.checkpoint_step}, restarts {j.restarts}")
    if j.valid_loss is not None and j.valid_accuracy is not None:
        print(f"validation (latest checkpoint): valid_loss {j.valid_loss:.3f}, "
              f"valid_accuracy {100 * j.valid_accuracy:.1f} %")
    if j.adapter_path:
        print(f"adapter: {j.adapter_path}")
    if j.fine_tuned_model:
        print(f"served as model: {j.fine_tuned_model} (harli generate --model "
              f"{j.fine_tuned_model})")
    if j.error:
        print(f"error: {j.error}")
    for e in d.events:
        print(f"  {job_log.line(e)}")
    return 0


def _logs(c: Any, job_id: int, as_json: bool, follow: bool) -> int:
    after_event = after_metric = 0
    while True:
        d = c.all_logs(job_id, after_event, after_metric)
        for e in job_log.merge(d.events, d.metrics):
            print(json.dumps(job_log.jsonable(e)) if as_json else job_log.line(e), flush=True)
        if d.events:
            after_event = d.events[-1].event_id
        if d.metrics:
            after_metric = d.metrics[-1].metric_id
        if not follow or d.job.status in ("succeeded", "failed", "cancelled"):
            return 0
        time.sleep(0.5)


def _plot(c: Any, job_id: int, out: Path) -> int:
    from harli.bench.plotting import PlotsUnavailable
    from harli.cli.loss_curve import NoMetrics, plot_loss_curve

    d = c.all_logs(job_id)
    try:
        plot_loss_curve(d.metrics, out, f"job {job_id} {d.job.name} ({d.job.status}, step "
                                        f"{d.job.step}/{d.job.total_steps or '?'})")
    except NoMetrics:
        print(f"harli job plot: job {job_id} ({d.job.status}) has no loss logged yet; it "
              f"logs one every {d.job.spec.log_every} optimizer step(s)", file=sys.stderr)
        return 1
    except PlotsUnavailable as e:
        print(f"harli job plot: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        raise CommandError(f"--out {out}: {e.strerror or e}") from None
    print(f"loss curve of job {job_id}: {out}")
    return 0
