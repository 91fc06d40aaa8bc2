"""Finetune dataset files, read and checked record by record, without a tokenizer.

A dataset is a JSONL file: one JSON object per line, blank lines skipped, lines numbered from 1,
every record in the same one of four formats (``chat``, ``alpaca``, ``prompt_completion``,
``text``; see :mod:`harli.datasets`). Two readers share one way of cutting the file into lines:

- :func:`scan_jsonl`, the structural check (JSON, format, fields' types, ``DatasetLimits``): each
  line is decoded by msgspec into the typed record of the file's format, in C, at disk speed
  (a daemon checks a file of a gigabyte in seconds, in a few megabytes of memory). A line the
  typed decoder refuses is read again by the exact reader below, which says what is wrong with it.
- :func:`iter_records`, the exact reader: each line parsed into a dict and its format told from
  its keys (:func:`detect_format`); tokenization reads records through it.

Files are read in blocks of ``BLOCK_BYTES``; a line longer than ``max_line_bytes``, a file over
``max_bytes`` or more than ``max_records`` records is refused as soon as it is seen, so nothing a
client names (``/dev/zero``, a runaway export) can hold the host's memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import msgspec

FORMATS = ("alpaca", "chat", "prompt_completion", "text")
CHAT_ROLES = ("system", "user", "assistant")

# Read this much of a file at a time: large enough that per-block work is noise, small enough
# that a reader's memory stays a few blocks whatever the file's size.
BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class DatasetLimits:
    """What one dataset may hold, so no file (``/dev/zero``, a runaway export) can exhaust the
    host's memory; the defaults are ``[finetune]``'s."""

    max_bytes: int = 1 << 30
    max_line_bytes: int = 4 << 20
    max_records: int = 1_000_000


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file (and line when one is at fault)."""


class DatasetCancelled(DatasetError):
    """Reading or tokenizing stopped because the caller asked (the daemon is stopping)."""


# --------------------------------------------------------------------------------------------
# Format detection and record validation


def _expect_str(record: Mapping[str, Any], key: str, where: str, fmt: str) -> None:
    value = record[key]
    if not isinstance(value, str):
        raise DatasetError(
            f"{where}: field {key!r} of a {fmt} record must be a string, "
            f"got {type(value).__name__}"
        )


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list):
        raise DatasetError(
            f"{where}: field 'messages' must be a list of messages, got {type(messages).__name__}"
        )
    if not messages:
        raise DatasetError(f"{where}: field 'messages' is an empty list")
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DatasetError(
                f"{where}: field {field!r} must be an object with 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise DatasetError(f"{where}: field '{field}.{key}' is missing")
            if not isinstance(message[key], str):
                raise DatasetError(
                    f"{where}: field '{field}.{key}' must be a string, "
                    f"got {type(message[key]).__name__}"
                )
        if message["role"] not in CHAT_ROLES:
            raise DatasetError(
                f"{where}: field '{field}.role' is {message['role']!r}; "
                f"expected one of {', '.join(CHAT_ROLES)}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(
            f"{where}: chat record has no assistant message, so nothing to learn from"
        )


def detect_format(record: Mapping[str, Any], where: str) -> str:
    """The format of one record (one of ``FORMATS``), after checking its fields' types.

    ``where`` (such as ``"data.jsonl:12"``) starts every error message.
    """
    if "messages" in record:
        _check_messages(record["messages"], where)
        return "chat"
    if "instruction" in record and "output" in record:
        _expect_str(record, "instruction", where, "alpaca")
        _expect_str(record, "output", where, "alpaca")
        if "input" in record:
            _expect_str(record, "input", where, "alpaca")
        return "alpaca"
    if "prompt" in record and "completion" in record:
        _expect_str(record, "prompt", where, "prompt_completion")
        _expect_str(record, "completion", where, "prompt_completion")
        return "prompt_completion"
    if "text" in record:
        _expect_str(record, "text", where, "text")
        return "text"
    keys = ", ".join(repr(k) for k in record) or "none"
    raise DatasetError(
        f"{where}: cannot tell the record's format from its keys ({keys}); expected 'messages' "
        "(chat), 'instruction' and 'output' (alpaca), 'prompt' and 'completion' "
        "(prompt_completion), or 'text' (text)"
    )



# --------------------------------------------------------------------------------------------
# Reading the file


@contextlib.contextmanager
def _open_regular(path: Path, limits: DatasetLimits) -> Iterator[BinaryIO]:
    """``path`` opened for reading if it is a regular file within ``limits.max_bytes``."""
    try:
        if not path.exists():
            raise DatasetError(f"{path}: dataset file does not exist")
        if path.is_dir():
            raise DatasetError(f"{path}: is a directory, not a JSONL dataset file")
        # O_NONBLOCK: opening a named pipe must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except DatasetError:
        raise
    except PermissionError as e:
        raise DatasetError(f"{path}: cannot be read (permission denied)") from e
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise DatasetError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") \
            from e
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DatasetError(f"{path}: not a regular file (a pipe, socket or device); a "
                               "dataset is a JSONL file")
        if st.st_size > limits.max_bytes:
            raise DatasetError(f"{path}: {st.st_size} bytes, over the limit of "
                               f"{limits.max_bytes} (finetune.max_dataset_bytes)")
        yield f


def file_size(path: Path) -> int:
    """The file's size in bytes (0 when it cannot be read: the readers then say why)."""
    try:
        return os.stat(path).st_size
    except (OSError, ValueError):
        return 0


def _over_size(path: Path, limits: DatasetLimits) -> DatasetError:
    # The file grew while it was read.
    return DatasetError(f"{path}: over the limit of {limits.max_bytes} bytes "
                        "(finetune.max_dataset_bytes)")


def _read(f: BinaryIO, path: Path, n: int) -> bytes:
    try:
        return f.read(n) or b""
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror or e})") from e


def _check_cancel(cancel: threading.Event | None, path: Path) -> None:
    if cancel is not None and cancel.is_set():
        raise DatasetCancelled(f"{path}: reading stopped (the daemon is stopping)")


def file_digest(path: Path, limits: DatasetLimits = DatasetLimits(),
                cancel: threading.Event | None = None) -> str:
    """sha256 of the file's bytes, read in blocks (never the whole file in memory)."""
    h = hashlib.sha256()
    for block, _ in _blocks(path, limits, cancel):
        h.update(block)
    return h.hexdigest()


def _blocks(path: Path, limits: DatasetLimits, cancel: threading.Event | None,
            ) -> Iterator[tuple[bytes, int]]:
    """(block, bytes read so far) of ``path``, ``BLOCK_BYTES`` at a time, then one empty
    block; refused past ``limits.max_bytes`` (a file that grew) or once ``cancel`` is set."""
    read = 0
    with _open_regular(path, limits) as f:
        while True:
            block = _read(f, path, BLOCK_BYTES)
            read += len(block)
            if read > limits.max_bytes:
                raise _over_size(path, limits)
            yield block, read
            if not block:
                return
            _check_cancel(cancel, path)


# Called after every block with (bytes read so far, records so far).
Progress = Callable[[int, int], None]


def _line_too_long(path: Path, lineno: int, limits: DatasetLimits, size: int | None = None,
                   ) -> DatasetError:
    what = f"line of {size} bytes, over" if size is not None else "line over"
    return DatasetError(f"{path}:{lineno}: {what} the limit of {limits.max_line_bytes} bytes "
                        "(finetune.max_line_bytes)")


def iter_line_blocks(path: Path, limits: DatasetLimits = DatasetLimits(),
                     cancel: threading.Event | None = None, digest: Any = None,
                     ) -> Iterator[tuple[int, list[bytes], int]]:
    """(number of the block's first line, its lines, bytes read so far) for ``path``, a block
    of whole lines at a time. Lines end at \\n, \\r\\n or \\r (``bytes.splitlines``, not
    the Unicode separators ``str.splitlines`` also honours, which may appear inside a JSON
    string); a UTF-8 byte-order mark that opens the file is dropped. ``digest`` (a hashlib
    object), if given, is fed every byte read."""
    lineno = 1
    rest = b""
    for block, read in _blocks(path, limits, cancel):
        if digest is not None:
            digest.update(block)
        data = rest + block if rest else block
        if read == len(block) and data.startswith(b"\xef\xbb\xbf"):  # a BOM, in the first
            data = data[3:]
        # Cut after the last \n: a \r\n never falls across two blocks.
        cut = data.rfind(b"\n") + 1 if block else len(data)
        rest = data[cut:]
        lines = data[:cut].splitlines()
        if len(rest) > limits.max_line_bytes + 1:
            # No \n within the limit: a line too long (lines ended by a lone \r are read up
            # to a \n too, so they count as one here).
            raise _line_too_long(path, lineno + len(lines), limits)
        if lines:
            if max(map(len, lines)) > limits.max_line_bytes:
                i = next(i for i, x in enumerate(lines) if len(x) > limits.max_line_bytes)
                raise _line_too_long(path, lineno + i, limits, len(lines[i]))
            yield lineno, lines, read
            lineno += len(lines)



def _parse_line(raw: bytes, where: str) -> dict[str, Any] | None:
    """The record on one line, None for a blank line; raises naming ``where``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{where}: not valid UTF-8 (byte {e.start})") from e
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from e
    except RecursionError:
        raise DatasetError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as e:  # an integer past Python's digit limit for str -> int
        raise DatasetError(f"{where}: not usable JSON: {e}") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: a record must be a JSON object, got {_json_type(record)}")
    try:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"), which is no text: the
        # tokenizer would fail on it later with a TypeError that names no line.
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DatasetError(
            f"{where}: a string holds a lone UTF-16 surrogate "
            f"({e.object[e.start:e.end]!a}), which is not text"
        ) from e
    return record


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    return type(value).__name__


def iter_records(path: Path, limits: DatasetLimits = DatasetLimits(),
                 cancel: threading.Event | None = None, digest: Any = None,
                 progress: Progress | None = None,
                 ) -> Iterator[tuple[int, dict[str, Any], str]]:
    """(line number, record, format) for each record of ``path``, streamed: the file is read a
    block at a time and each record checked as it comes; raises on the first bad line, a
    record in another format than the first, or over ``limits``. ``progress(bytes, records)``
    is called before each block's records are handed out."""
    reader = _ExactReader(path, limits)
    for start, lines, read in iter_line_blocks(path, limits, cancel, digest):
        if progress is not None:
            progress(read, reader.count)
        for i, raw in enumerate(lines):
            record = reader.read(raw, start + i)
            if record is not None:
                yield start + i, record, reader.fmt
    reader.finish()


class _ExactReader:
    """The record on each line, checked: JSON, its format told from its keys, the file's one
    format, ``max_records``; the readers' shared per-line rule."""

    def __init__(self, path: Path, limits: DatasetLimits) -> None:
        self.path = path
        self.limits = limits
        self.fmt = ""
        self.first_line = 0
        self.count = 0

    def read(self, raw: bytes, lineno: int) -> dict[str, Any] | None:
        """The record on line ``lineno`` (None for a blank line); raises naming it."""
        where = f"{self.path}:{lineno}"
        record = _parse_line(raw, where)
        if record is None:
            return None
        self.count += 1
        if self.count > self.limits.max_records:
            raise _too_many(where, self.limits)
        record_fmt = detect_format(record, where)
        if not self.fmt:
            self.fmt, self.first_line = record_fmt, lineno
        elif record_fmt != self.fmt:
            raise _other_format(where, record_fmt, self.fmt, self.first_line)
        return record

    def finish(self) -> None:
        if not self.count:
            raise DatasetError(f"{self.path}: dataset has no records (the file is empty or "
                               "blank)")


def _too_many(where: str, limits: DatasetLimits) -> DatasetError:
    return DatasetError(f"{where}: more than {limits.max_records} records "
                        "(finetune.max_dataset_records)")


def _other_format(where: str, record_fmt: str, fmt: str, first_line: int) -> DatasetError:
    return DatasetError(f"{where}: record is in format {record_fmt!r} but the file's first "
                        f"record (line {first_line}) is in format {fmt!r}; a dataset uses one "
                        "format")


# --------------------------------------------------------------------------------------------
# The structural check at disk speed: one typed record per format. Fields of the formats that
# ``detect_format`` would pick first are kept raw, so a record holding them is read again by the
# exact reader (and refused as of another format), never taken for this one.


class _Message(msgspec.Struct):
    role: Literal["system", "user", "assistant"]
    content: str


class _Chat(msgspec.Struct):
    messages: list[_Message]


class _Alpaca(msgspec.Struct):
    instruction: str
    output: str
    input: str = ""
    messages: msgspec.Raw = msgspec.Raw()


class _PromptCompletion(msgspec.Struct):
    prompt: str
    completion: str
    messages: msgspec.Raw = msgspec.Raw()
    instruction: msgspec.Raw = msgspec.Raw()
    output: msgspec.Raw = msgspec.Raw()


class _Text(msgspec.Struct):
    text: str
    messages: msgspec.Raw = msgspec.Raw()
    instruction: msgspec.Raw = msgspec.Raw()
    output: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
    completion: msgspec.Raw = msgspec.Raw()


def _is_chat(r: Any) -> bool:
    return bool(r.messages) and any(m.role == "assistant" for m in r.messages)


def _is_alpaca(r: Any) -> bool:
    return not r.messages


def _is_prompt_completion(r: Any) -> bool:
    return not r.messages and not (r.instruction and r.output)


def _is_text(r: Any) -> bool:
    return not r.messages and not (r.instruction and r.output) \
        and not (r.prompt and r.completion)


# format -> (typed decoder, what else a decoded record must hold to be of this format)
_TYPED: dict[str, tuple[msgspec.json.Decoder[Any], Callable[[Any], bool]]] = {
    "chat": (msgspec.json.Decoder(_Chat), _is_chat),
    "alpaca": (msgspec.json.Decoder(_Alpaca), _is_alpaca),
    "prompt_completion": (msgspec.json.Decoder(_PromptCompletion), _is_prompt_completion),
    "text": (msgspec.json.Decoder(_Text), _is_text),
}


def scan_jsonl(path: Path, limits: DatasetLimits = DatasetLimits(),
               cancel: threading.Event | None = None, digest: Any = None,
               progress: Progress | None = None) -> JsonlSummary:
    """Every check :func:`iter_records` makes (JSON lines, one format, the fields' types,
    ``limits``), streamed at disk speed; raises the same :class:`DatasetError` on the same
    first bad line. ``progress(bytes, records)`` is called after every block."""
    reader = _ExactReader(path, limits)
    typed: Any = None
    holds: Callable[[Any], bool] = _is_chat
    for start, lines, read in iter_line_blocks(path, limits, cancel, digest):
        for i, raw in enumerate(lines):
            if typed is not None:
                try:
                    if holds(typed.decode(raw)):
                        reader.count += 1
                        if reader.count > limits.max_records:
                            raise _too_many(f"{path}:{start + i}", limits)
                        continue
                except (msgspec.DecodeError, msgspec.ValidationError):
                    pass
            # The first record, a blank line, or one the typed decoder refused: the exact
            # reader decides, and names the fault.
            if reader.read(raw, start + i) is not None and typed is None:
                typed, holds = _TYPED[reader.fmt]
        if progress is not None:
            progress(read, reader.count)
    reader.finish()
    return JsonlSummary(format=reader.fmt, records=reader.count)

# Datasets uploaded through the HTTP API live in one directory (``HarliConfig.files_dir``) as
# ``<file_id>.jsonl``; an upload is written under ``.upload-*`` there first. The HTTP front
# writes them, the daemon records them: both name them here.
UPLOAD_SUFFIX = ".jsonl"
UPLOAD_TEMP_PREFIX = ".upload-"


def upload_path(files_dir: Path, file_id: str) -> Path:
    return files_dir / f"{file_id}{UPLOAD_SUFFIX}"


@dataclass(frozen=True)
class JsonlSummary:
    """What :func:`check_jsonl` found in a file."""

    format: str
    records: int


def check_jsonl(path: Path, limits: DatasetLimits = DatasetLimits(),
                shown_as: str | None = None) -> JsonlSummary:
    """Every check :func:`load_dataset` makes before it tokenizes (JSON lines, one format,
    the fields' types, ``limits``), streamed, without a tokenizer: what an uploaded file is
    checked with before it is kept. A :class:`DatasetError`'s message names ``shown_as``
    (the name the file was uploaded under) in place of ``path``, as ``train.jsonl:12: ...``."""
    try:
        return scan_jsonl(path, limits)
    except DatasetError as e:
        if shown_as is None:
            raise
        message = str(e)
        if message.startswith(str(path)):
            message = shown_as + message[len(str(path)):]
        raise DatasetError(message) from None


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], str]:
    """The records of a JSONL dataset and their single format (see the module docstring)."""
    records: list[dict[str, Any]] = []
    fmt = ""
    for _, record, record_fmt in iter_records(Path(path)):
        records.append(record)
        fmt = record_fmt  # one format per file: iter_records refuses a second
    return records, fmt

