"""``harli attach DATASET [options] [--follow]``: queue a LoRA finetune job on the daemon.

The daemon stores the job at once (``validating_files``) and checks its files in the
background; the command shows that check's progress and waits for its outcome (queued, or
failed naming the file and line at fault), for as long as it takes: each request to the daemon
has its own timeout, the wait none."""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from harli.cli.command import (
    Command,
    CommandError,
    add_endpoint_arguments,
    curve_kwargs,
    resolve_endpoint,
)
from harli.ipc.jobs import JobSpec

# CLI option -> JobSpec field (dotted for LoRA settings).
_OPTIONS: dict[str, tuple[str, type]] = {
    "name": ("name", str), "output_dir": ("output_dir", str), "priority": ("priority", int),
    "lr": ("learning_rate", float), "lr_schedule": ("lr_schedule", str),
    "warmup_steps": ("warmup_steps", int), "epochs": ("epochs", int),
    "max_steps": ("max_steps", int), "micro_batch_size": ("micro_batch_size", int),
    "grad_accum": ("grad_accum", int), "max_seq_len": ("max_seq_len", int),
    "seed": ("seed", int), "checkpoint_every": ("checkpoint_every", int),
    "keep_checkpoints": ("keep_checkpoints", int), "base_model": ("base_model", str),
    "lora_r": ("lora.r", int), "lora_alpha": ("lora.alpha", int),
    "lora_dropout": ("lora.dropout", float), "log_every": ("log_every", int),
    "validation_file": ("validation_file", str),
}
# Help beyond the field's name.
_HELP = {
    "validation_file": "JSONL file in a dataset format, scored at every checkpoint: "
                       "valid_loss and next-token accuracy (JobSpec.validation_file)",
    "log_every": "optimizer steps between two logged steps (metric events); JobSpec.log_every",
}


def read_spec_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CommandError(f"job file {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CommandError(f"job file {path}: not valid {path.suffix[1:] or 'JSON'}: {e}") \
            from None
    if not isinstance(data, dict):
        raise CommandError(f"job file {path}: expected a table/object at the top level")
    return data


def build_spec(args: argparse.Namespace) -> JobSpec:
    data = read_spec_file(Path(args.spec)) if args.spec else {}
    if args.dataset:
        data["dataset"] = args.dataset
    if "dataset" not in data:
        raise CommandError("no dataset: give DATASET or a job file with `dataset`")
    for opt, (field, _) in _OPTIONS.items():
        value = getattr(args, opt)
        if value is None:
            continue
        if field.startswith("lora."):
            data.setdefault("lora", {})[field[5:]] = value
        else:
            data[field] = value
    if args.target_modules:
        data.setdefault("lora", {})["target_modules"] = args.target_modules.split(",")
    if args.publish_checkpoints:
        data["publish_checkpoints"] = True
    data["dataset"] = str(Path(data["dataset"]).expanduser().absolute())
    if isinstance(data.get("validation_file"), str) and data["validation_file"]:
        data["validation_file"] = str(Path(data["validation_file"]).expanduser().absolute())
    data.setdefault("name", f"{Path(data['dataset']).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if data.get("output_dir"):  # else the daemon's finetune.output_root / name
        data["output_dir"] = str(Path(data["output_dir"]).expanduser().absolute())
    try:
        return msgspec.convert(data, JobSpec)
    except msgspec.ValidationError as e:
        raise CommandError(f"invalid job: {e}") from None


def follow_validation(client: Any, job: Any, poll_s: float = 0.25) -> Any:
    """Show the check of ``job``'s files until it ends; return the job then (queued or
    failed). A daemon that stops meanwhile keeps the job and checks it again when it starts."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from harli.client.inference import RequestError

    cols = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TextColumn("{task.fields[records]} records"),
            TimeRemainingColumn())
    # On stderr, and only on a terminal: stdout is the job's id (or JSON), for scripts.
    with Progress(*cols, transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task(f"job {job.job_id}: waiting for a worker", total=None,
                                 records=0)
        while job.status == "validating_files":
            v = job.validation
            if v is not None and v.stage != "waiting":
                progress.update(task, description=f"job {job.job_id}: {v.stage} {v.file}",
                                total=v.bytes_total or None, completed=v.bytes_done,
                                records=v.records)
            time.sleep(poll_s)
            try:
                job = client.show(job.job_id).job
            except RequestError as e:
                if e.code in ("timeout", "shutting_down"):
                    raise RequestError(
                        e.code, f"the daemon stopped answering while job {job.job_id}'s files "
                                f"were checked ({e.message}); it keeps the job and checks them "
                                f"again when it starts: see `harli job show {job.job_id}`"
                    ) from None
                raise
    return job


def follow(client: Any, job_id: int, poll_s: float = 0.5) -> str:
    """Show a live progress bar until the job ends; return its final status."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    cols = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("level {task.fields[level]}"), TextColumn("{task.fields[status]}"),
            TimeRemainingColumn())
    with Progress(*cols) as progress:
        task = progress.add_task(f"job {job_id}", total=None, loss="-", tps="-", level="-",
                                 status="queued")
        while True:
            job = client.show(job_id).job
            progress.update(task, total=job.total_steps, completed=job.step,
                            loss=f"{job.loss:.3f}" if job.loss is not None else "-",
                            tps=f"{job.tokens_per_s:.0f}" if job.tokens_per_s else "-",
                            level=job.level if job.level is not None else "-",
                            status=job.status)
            if job.status in ("succeeded", "failed", "cancelled"):
                return str(job.status)
            time.sleep(poll_s)


class AttachCommand(Command):
    name = "attach"
    help = "queue a LoRA finetune job on the running daemon"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("dataset", nargs="?", help="JSONL dataset (alpaca, chat, "
                       "prompt/completion or text records)")
        p.add_argument("--spec", metavar="FILE", help="job spec as TOML or JSON; options "
                       "given here override it")
        for opt, (field, typ) in _OPTIONS.items():
            p.add_argument("--" + opt.replace("_", "-"), type=typ,
                           help=_HELP.get(opt, f"JobSpec.{field}"))
        p.add_argument("--target-modules", help="comma-separated LoRA target modules")
        p.add_argument("--publish-checkpoints", action="store_true",
                       help="serve each checkpoint as model NAME@step-N as it is written "
                       "(JobSpec.publish_checkpoints)")
        p.add_argument("--follow", action="store_true", help="show progress until it ends")
        p.add_argument("--no-wait", action="store_true",
                       help="return once the job is stored (validating_files), without "
                       "waiting for the check of its files")
        p.add_argument("--json", action="store_true", help="print the stored job as JSON")
        add_endpoint_arguments(p)

    def run(self, args: argparse.Namespace) -> int:
        from harli.client.control import ControlClient, to_jsonable

        spec = build_spec(args)
        # A refusal propagates: main prints "harli attach: invalid: ..." and exits 1.
        with ControlClient(resolve_endpoint(args, "control"), **curve_kwargs(args)) as client:
            job = client.attach(spec)
            if not args.no_wait:
                job = follow_validation(client, job)
            print(json.dumps(to_jsonable(job)) if args.json else job.job_id)
            if job.status == "failed":
                print(f"harli attach: job {job.job_id} failed the check of its files: "
                      f"{job.error}", file=sys.stderr)
                return 1
            if args.follow:
                return 0 if follow(client, job.job_id) == "succeeded" else 1
        return 0
