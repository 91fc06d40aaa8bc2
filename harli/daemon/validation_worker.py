"""The dataset validation worker: one process per job whose files are being checked
(``python -m harli.daemon.validation_worker FD``, started by ``DatasetValidations``; ``FD`` is
its end of a socket pair: the job comes in, progress and the outcome go out).

For each file it runs the structural check first (``scan_jsonl``: JSON, format, fields and
limits, at disk speed), so a bad line anywhere is reported within seconds, then tokenizes the
file into the ``TokenizedCache`` an example at a time. It reports progress after every block it
reads and ends with ``ValidationDone`` or ``ValidationFailed``. It runs as background work
(``SCHED_BATCH`` at nice 19: decode, the daemon and their clients preempt it at once, a
training finetune in ``idle`` does not starve it) and dies with the daemon; a worker that is no
longer wanted is killed, which is how a validation is cancelled. It imports the tokenizer's
libraries (seconds) only once the structural check has passed, so a bad line is reported
without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import msgspec

from harli.dataset_records import DatasetError, DatasetLimits, Progress, file_size, scan_jsonl
from harli.ipc.validation import (
    CheckFile,
    ValidateJob,
    ValidationDone,
    ValidationFailed,
    ValidationProgress,
)

logger = logging.getLogger(__name__)

# At most this many progress messages a second within a stage (its start is always sent): a
# fast check sends its blocks' progress without flooding the daemon's loop.
PROGRESS_EVERY_S = 0.2
Stage = Literal["checking", "tokenizing"]
_PURPOSE = {"dataset": "to learn from", "validation_file": "to score"}


class _Reporter:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._last = 0.0

    def send(self, msg: ValidationProgress | ValidationDone | ValidationFailed) -> None:
        self.conn.send_bytes(msgspec.msgpack.encode(msg))

    def stage(self, f: CheckFile, stage: Stage, total: int) -> Progress:
        """Report that ``stage`` of ``f`` begins; the callable reports its progress."""
        self.send(ValidationProgress(key=f.key, stage=stage, bytes_done=0, bytes_total=total,
                                     records=0))
        self._last = time.monotonic()

        def report(done: int, records: int) -> None:
            now = time.monotonic()
            if now - self._last >= PROGRESS_EVERY_S:
                self._last = now
                self.send(ValidationProgress(key=f.key, stage=stage, bytes_done=done,
                                             bytes_total=total, records=records))
        return report


def main(argv: list[str] | None = None) -> int:
    """The worker's entry: the job from the socket pair's end ``argv[0]``, its report back."""
    from harli.runtime import configure_logging, die_with_parent

    die_with_parent()  # it ends when the daemon does
    configure_logging("validate", "INFO")
    args = sys.argv[1:] if argv is None else argv
    conn = Connection(int(args[0]))
    try:
        request = conn.recv_bytes()
    except (EOFError, OSError):  # the daemon went away before it sent the job
        return 1
    run_validation(conn, request)
    return 0


def run_validation(conn: Connection, request: bytes) -> None:
    """Check ``request``'s files, report on ``conn``."""
    from harli.runtime import set_cpu_scheduling, set_title

    out = _Reporter(conn)
    try:
        job = msgspec.msgpack.decode(request, type=ValidateJob)
        set_title(f"harli::validate[{job.job_id}]")
        with contextlib.suppress(OSError):
            set_cpu_scheduling(job.cpu_scheduling_policy, job.nice, "validation")
        out.send(ValidationDone(report=validate(job, out)))
    except DatasetError as e:
        out.send(ValidationFailed(error=str(e)))
    except Exception as e:  # a bug here fails this job, named, not the daemon
        logger.exception("[validation] checking job files failed")
        out.send(ValidationFailed(error=f"checking the job's files failed: {e!r}"))
    finally:
        conn.close()


def _tokenizer(model_dir: str) -> Any:
    """The model's tokenizer, loaded without torch: transformers imports torch whenever it can
    (seconds, and ~300 MB) though tokenizing never uses it, and reads a None in ``sys.modules``
    as "not installed". The ids and the tokenizer's fingerprint are the same as with torch, so
    the finetune finds the entry this worker writes."""
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # not "PyTorch was not found"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def validate(job: ValidateJob, out: _Reporter) -> dict[str, int | str]:
    from harli.datasets import TokenizedCache, tokenize_to_cache

    limits = DatasetLimits(max_bytes=job.max_bytes, max_line_bytes=job.max_line_bytes,
                           max_records=job.max_records)
    report: dict[str, int | str] = {}
    tokenizer = None
    for f in job.files:
        path = Path(f.path)
        total = file_size(path)
        prefix = "" if f.key == "dataset" else f"{f.key}: "
        try:
            # The check's hash of the bytes finds a cache entry without reading them again.
            digest = hashlib.sha256()
            scan_jsonl(path, limits, digest=digest, progress=out.stage(f, "checking", total))
            if tokenizer is None:
                tokenizer = _tokenizer(job.model_dir)
            got = tokenize_to_cache(path, tokenizer, job.max_seq_len,
                                    TokenizedCache(Path(job.cache_dir)), limits,
                                    progress=out.stage(f, "tokenizing", total),
                                    file_sha256=digest.hexdigest())
        except DatasetError as e:
            raise DatasetError(f"{prefix}{e}") from None
        if got.loss_tokens == 0:
            raise DatasetError(f"{f.key} {path}: no response tokens left {_PURPOSE[f.key]} at "
                               f"max_seq_len {job.max_seq_len}")
        if f.key == "dataset":
            report.update(got.as_dict())
        else:
            report.update({f"validation_{k}": v for k, v in got.as_dict().items()
                           if k != "source"})
    return report


if __name__ == "__main__":
    sys.exit(main())
