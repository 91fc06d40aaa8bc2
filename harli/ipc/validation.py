"""Daemon <-> dataset validation worker: the job whose files to check, and what the worker
reports back (progress after every block it reads, then the outcome). Array-encoded, tagged by
class name, like the other internal channels; sent over a pipe (``multiprocessing``'s
``send_bytes``), never pickled."""

from __future__ import annotations

from typing import Literal

import msgspec


class _Msg(msgspec.Struct, array_like=True, frozen=True, kw_only=True, tag=True):
    pass


class CheckFile(_Msg, frozen=True):
    key: Literal["dataset", "validation_file"]  # the job spec's field that names it
    path: str


class ValidateJob(_Msg, frozen=True):
    job_id: int
    files: list[CheckFile]
    max_seq_len: int
    model_dir: str  # its tokenizer
    cache_dir: str  # the TokenizedCache the finetune reads
    max_bytes: int
    max_line_bytes: int
    max_records: int
    # The worker's CPU scheduling: background work that must not delay decode or the daemon
    # (``batch`` at nice 19 yields to them at once), yet ahead of a training finetune
    # (``idle``, which may run on every core at a high level): a check is short, and the
    # jobs it unblocks wait for it. Decode is also protected by the hold (SIGSTOP).
    cpu_scheduling_policy: Literal["other", "batch", "idle"] = "batch"
    nice: int = 19


class ValidationProgress(_Msg, frozen=True):
    key: str  # the file being read (CheckFile.key)
    # checking: JSON, format, fields and limits, at disk speed; tokenizing: into the cache
    stage: Literal["checking", "tokenizing"]
    bytes_done: int
    bytes_total: int
    records: int


class ValidationDone(_Msg, frozen=True):
    # The job's dataset report: the dataset's numbers, the validation file's prefixed
    # ``validation_`` (as the job store keeps them).
    report: dict[str, int | str]


class ValidationFailed(_Msg, frozen=True):
    error: str  # names the file and line at fault, and what to change


WorkerToDaemon = ValidationProgress | ValidationDone | ValidationFailed
