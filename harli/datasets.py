"""Finetune datasets: read a JSONL file, check it, and tokenize it into labelled examples.

Shared by the daemon (which checks a job's file at attach) and the finetune (which trains on it).
The daemon's tokenization is the only one: it goes into a :class:`TokenizedCache` keyed by the
file's bytes, the tokenizer and ``max_seq_len``, and the finetune reads it from there. A file
changed since attach (or a cache entry gone) is a miss: tokenized again, logged, and reported as
``source: "file"`` in the job's dataset report.

A finetune job names one JSONL file: one JSON object per line, blank lines skipped, lines
numbered from 1. Every record of a file must be in the same one of four formats, told apart by
their keys (checked in this order):

``chat``
    ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``, at least
    one assistant message. Loss on the content of each assistant message and the eos token that
    closes it; none on system/user messages or on the role headers.
``alpaca``
    ``{"instruction": str, "output": str, "input": str (optional)}``. The prompt is
    ``"### Instruction:\\n{instruction}\\n\\n"`` + ``"### Input:\\n{input}\\n\\n"`` (only when input
    is not empty) + ``"### Response:\\n"``; the response is ``output`` followed by eos. Loss on the
    response only.
``prompt_completion``
    ``{"prompt": str, "completion": str}``: the text is prompt + completion + eos; loss on the
    completion and eos.
``text``
    ``{"text": str}``: the text followed by eos, loss on every token.

Other keys in a record are ignored.

Tokenization: text is tokenized with ``tokenizer(text, add_special_tokens=False)`` (no bos is
added; a chat template that wants one writes it into the rendered text), and the eos that ends a
response is the tokenizer's ``eos_token_id``. The prompt part and the loss part are tokenized
separately and the token lists concatenated, so the boundary between "no loss" and "loss" falls
exactly between two tokens instead of inside a BPE merge that spans it. (For a byte-level BPE
tokenizer and prompts ending in a newline, as here, this gives the same ids as tokenizing the
whole text at once.) Labels are the input ids where there is loss and ``IGNORE_INDEX`` elsewhere;
the shift for next-token prediction is left to the model.

Chat rendering: when the tokenizer has a ``chat_template`` the conversation is rendered with
``tokenizer.apply_chat_template(..., tokenize=False)``; otherwise with the default template
(:func:`default_chat_render`)::

    <|{role}|>\\n{content}{eos}\\n            (for each message, eos = the tokenizer's eos text)
    <|assistant|>\\n                         (only with add_generation_prompt)

The conversation is rendered prefix by prefix (messages ``[:i]`` then ``[:i+1]``) and each
message's part of the text tokenized on its own; the concatenated text is exactly the rendering of
the whole conversation. A template that does not render prefixes as prefixes of the whole, or that
alters the assistant content, is refused with a :class:`DatasetError`.

Truncation: an example longer than ``max_seq_len`` tokens keeps its first ``max_seq_len`` tokens;
such records are counted in :class:`DatasetReport` and logged once per file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import msgspec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# The small dataset shipped with harli (alpaca records: number words -> digits), used by the
# demo, the benchmarks and the profiler as the representative job.
SAMPLE_DATASET = Path(__file__).resolve().parent / "data" / "digits.jsonl"

FORMATS = ("alpaca", "chat", "prompt_completion", "text")
IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_EOS_TEXT = "<|eos|>"


@dataclass(frozen=True)
class DatasetLimits:
    """What one dataset may hold, so no file (``/dev/zero``, a runaway export) can exhaust the
    host's memory; the defaults are ``[finetune]``'s."""

    max_bytes: int = 1 << 30
    max_line_bytes: int = 4 << 20
    max_records: int = 1_000_000


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file (and line when one is at fault)."""


@dataclass(frozen=True)
class Example:
    """One tokenized record: ``labels`` is as long as ``input_ids``, ``IGNORE_INDEX`` = no loss."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class DatasetReport:
    """What :func:`load_dataset` read and made of it."""

    path: str
    format: str
    records: int
    truncated: int  # records cut to max_seq_len
    tokens: int  # total tokens after truncation
    loss_tokens: int  # tokens the loss is taken over (labelled, after the first token)
    cache_key: str = ""  # the TokenizedCache entry that holds the examples
    source: str = "file"  # "file": tokenized here; "cache": read from the TokenizedCache

    def as_dict(self) -> dict[str, int | str]:
        """The report as the job store and the wire carry it."""
        return asdict(self)


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


_READ_CHUNK_BYTES = 1 << 20  # hashing reads the file in pieces of this size


@contextlib.contextmanager
def _open_regular(path: Path, limits: DatasetLimits) -> Iterator[BinaryIO]:
    """``path`` opened for reading if it is a regular file within ``limits.max_bytes``."""
    if not path.exists():
        raise DatasetError(f"{path}: dataset file does not exist")
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory, not a JSONL dataset file")
    try:
        # O_NONBLOCK: opening a named pipe must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError as e:
        raise DatasetError(f"{path}: cannot be read (permission denied)") from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror or e})") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DatasetError(f"{path}: not a regular file (a pipe, socket or device); a "
                               "dataset is a JSONL file")
        if st.st_size > limits.max_bytes:
            raise DatasetError(f"{path}: {st.st_size} bytes, over the limit of "
                               f"{limits.max_bytes} (finetune.max_dataset_bytes)")
        yield f


def _over_size(path: Path, limits: DatasetLimits) -> DatasetError:
    # The file grew while it was read.
    return DatasetError(f"{path}: over the limit of {limits.max_bytes} bytes "
                        "(finetune.max_dataset_bytes)")


def file_digest(path: Path, limits: DatasetLimits = DatasetLimits(),
                cancel: threading.Event | None = None) -> str:
    """sha256 of the file's bytes, read in pieces (never the whole file in memory)."""
    h = hashlib.sha256()
    read = 0
    with _open_regular(path, limits) as f:
        while chunk := _read(f, path, _READ_CHUNK_BYTES):
            read += len(chunk)
            if read > limits.max_bytes:
                raise _over_size(path, limits)
            h.update(chunk)
            _check_cancel(cancel, path)
    return h.hexdigest()


def _read(f: BinaryIO, path: Path, n: int, line: bool = False) -> bytes:
    try:
        return f.readline(n) if line else f.read(n)
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror or e})") from e


class DatasetCancelled(DatasetError):
    """Reading or tokenizing stopped because the caller asked (the daemon is stopping)."""


def _check_cancel(cancel: threading.Event | None, path: Path) -> None:
    if cancel is not None and cancel.is_set():
        raise DatasetCancelled(f"{path}: reading stopped (the daemon is stopping)")


def _iter_lines(path: Path, limits: DatasetLimits, cancel: threading.Event | None,
                digest: Any = None) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line of ``path``, read one line at a time; a line over
    ``limits.max_line_bytes`` or a file over ``limits.max_bytes`` raises as soon as it is seen.
    ``digest`` (a hashlib object), if given, is fed every byte read."""
    lineno = 0
    read = 0
    with _open_regular(path, limits) as f:
        while raw := _read(f, path, limits.max_line_bytes + 2, line=True):
            read += len(raw)
            if read > limits.max_bytes:
                raise _over_size(path, limits)
            if digest is not None:
                digest.update(raw)
            if lineno == 0 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM some editors write
                raw = raw[3:]
            # bytes.splitlines splits on \n, \r\n and \r only, not on the Unicode separators
            # that str.splitlines also honours (and that may appear inside a JSON string). Lines
            # are read up to \n, so a file whose lines end in a lone \r is read whole lines
            # within max_line_bytes at a time.
            if len(raw) > limits.max_line_bytes + 1 and not raw.endswith(b"\n"):
                # readline stopped at its limit inside a line (a lone \r ends no line here).
                raise DatasetError(f"{path}:{lineno + 1}: line over the limit of "
                                   f"{limits.max_line_bytes} bytes (finetune.max_line_bytes)")
            for piece in raw.splitlines() or [b""]:
                lineno += 1
                if len(piece) > limits.max_line_bytes:
                    raise DatasetError(f"{path}:{lineno}: line of {len(piece)} bytes, over the "
                                       f"limit of {limits.max_line_bytes} "
                                       "(finetune.max_line_bytes)")
                if lineno % 1024 == 0:
                    _check_cancel(cancel, path)
                yield lineno, piece


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
                 ) -> Iterator[tuple[int, dict[str, Any], str]]:
    """(line number, record, format) for each record of ``path``, streamed: a file is read
    one line at a time and each record checked as it comes; raises on the first bad line, a
    record in another format than the first, or over ``limits``."""
    fmt = ""
    first_line = 0
    count = 0
    for lineno, raw in _iter_lines(path, limits, cancel, digest):
        where = f"{path}:{lineno}"
        record = _parse_line(raw, where)
        if record is None:
            continue
        count += 1
        if count > limits.max_records:
            raise DatasetError(f"{where}: more than {limits.max_records} records "
                               "(finetune.max_dataset_records)")
        record_fmt = detect_format(record, where)
        if not fmt:
            fmt, first_line = record_fmt, lineno
        elif record_fmt != fmt:
            raise DatasetError(
                f"{where}: record is in format {record_fmt!r} but the file's first "
                f"record (line {first_line}) is in format {fmt!r}; a dataset uses one format"
            )
        yield lineno, record, fmt
    if not count:
        raise DatasetError(f"{path}: dataset has no records (the file is empty or blank)")


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
    fmt, count = "", 0
    try:
        for _, _, record_fmt in iter_records(path, limits):
            fmt = record_fmt  # one format per file: iter_records refuses a second
            count += 1
    except DatasetError as e:
        if shown_as is None:
            raise
        message = str(e)
        if message.startswith(str(path)):
            message = shown_as + message[len(str(path)):]
        raise DatasetError(message) from None
    return JsonlSummary(format=fmt, records=count)


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], str]:
    """The records of a JSONL dataset and their single format (see the module docstring)."""
    records: list[dict[str, Any]] = []
    fmt = ""
    for _, record, record_fmt in iter_records(Path(path)):
        records.append(record)
        fmt = record_fmt  # one format per file: iter_records refuses a second
    return records, fmt


# --------------------------------------------------------------------------------------------
# Tokenization


def default_chat_render(
    messages: Sequence[Mapping[str, str]],
    eos_token: str = DEFAULT_EOS_TEXT,
    add_generation_prompt: bool = False,
) -> str:
    """Render a conversation with the default template (for tokenizers without a chat template).

    Each message is ``"<|{role}|>\\n{content}{eos_token}\\n"``; with ``add_generation_prompt``
    the text ends with ``"<|assistant|>\\n"``. This is the same text the tiny model's template
    gives.
    """
    text = "".join(f"<|{m['role']}|>\n{m['content']}{eos_token}\n" for m in messages)
    if add_generation_prompt:
        text += "<|assistant|>\n"
    return text


class _Builder:
    """Accumulates token ids and labels piece by piece."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.input_ids: list[int] = []
        self.labels: list[int] = []

    def text(self, text: str, loss: bool) -> None:
        if text:
            self.ids(_encode(self.tokenizer, text), loss)

    def ids(self, ids: list[int], loss: bool) -> None:
        self.input_ids.extend(ids)
        self.labels.extend(ids if loss else [IGNORE_INDEX] * len(ids))


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _eos(tokenizer: PreTrainedTokenizerBase) -> tuple[int, str]:
    eos_id = tokenizer.eos_token_id
    eos_text = tokenizer.eos_token
    if eos_id is None or not isinstance(eos_text, str):
        raise ValueError("the tokenizer has no eos token; finetune datasets need one")
    return int(eos_id), eos_text


def _chat_renderer(
    tokenizer: PreTrainedTokenizerBase, where: str
) -> Callable[[list[dict[str, str]], bool], str]:
    eos_text = _eos(tokenizer)[1]
    if getattr(tokenizer, "chat_template", None) is None:
        return lambda messages, gen: default_chat_render(messages, eos_text, gen)

    def render(messages: list[dict[str, str]], gen: bool) -> str:
        if not messages and not gen:
            return ""
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen
            )
        except Exception as e:  # jinja raises its own errors (raise_exception in templates)
            raise DatasetError(f"{where}: the tokenizer's chat template failed: {e}") from e
        if not isinstance(text, str):
            raise DatasetError(f"{where}: the tokenizer's chat template did not render text")
        return text

    return render


def _tokenize_chat(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, where: str
) -> _Builder:
    eos_id, eos_text = _eos(tokenizer)
    render = _chat_renderer(tokenizer, where)
    out = _Builder(tokenizer)
    prev = ""
    for i, message in enumerate(messages):
        cur = render(messages[: i + 1], False)
        if not cur.startswith(prev):
            raise DatasetError(
                f"{where}: the chat template does not render the conversation incrementally "
                f"(the text for messages[:{i}] is not a prefix of the text for messages[:{i + 1}])"
            )
        delta = cur[len(prev):]
        if message["role"] != "assistant":
            out.text(delta, loss=False)
            prev = cur
            continue
        content = message["content"]
        start = -1
        try:
            gen = render(messages[:i], True)
        except DatasetError:
            gen = ""
        if gen.startswith(prev) and cur.startswith(gen):
            header = len(gen) - len(prev)
            if delta.startswith(content, header):
                start = header
        if start < 0:
            start = delta.find(content)
        if start < 0:
            raise DatasetError(
                f"{where}: the chat template changes the content of messages[{i}] "
                "(it does not appear verbatim in the rendered text)"
            )
        end = start + len(content)
        out.text(delta[:start], loss=False)
        out.text(content, loss=True)
        rest = delta[end:]
        if rest.startswith(eos_text):
            out.ids([eos_id], loss=True)
            rest = rest[len(eos_text):]
        out.text(rest, loss=False)
        prev = cur
    return out


def alpaca_prompt(record: Mapping[str, Any]) -> str:
    """An alpaca record's prompt, as the job trains on it (and as a served model is asked)."""
    prompt = f"### Instruction:\n{record['instruction']}\n\n"
    if record.get("input"):
        prompt += f"### Input:\n{record['input']}\n\n"
    return prompt + "### Response:\n"


def tokenize_record(
    record: Mapping[str, Any],
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    *,
    where: str = "record",
) -> tuple[Example, bool]:
    """Tokenize one record already checked by :func:`detect_format` as ``fmt``.

    Returns the example (cut to ``max_seq_len`` tokens) and whether it was cut. ``where`` names
    the record in errors (a chat template that cannot be used).
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be at least 1, got {max_seq_len}")
    eos_id, _ = _eos(tokenizer)
    if fmt == "chat":
        out = _tokenize_chat(record["messages"], tokenizer, where)
    else:
        out = _Builder(tokenizer)
        if fmt == "alpaca":
            out.text(alpaca_prompt(record), loss=False)
            out.text(record["output"], loss=True)
        elif fmt == "prompt_completion":
            out.text(record["prompt"], loss=False)
            out.text(record["completion"], loss=True)
        elif fmt == "text":
            out.text(record["text"], loss=True)
        else:
            raise ValueError(f"unknown dataset format {fmt!r}; expected one of {FORMATS}")
        out.ids([eos_id], loss=True)
    truncated = len(out.input_ids) > max_seq_len
    example = Example(out.input_ids[:max_seq_len], out.labels[:max_seq_len])
    return example, truncated


# --------------------------------------------------------------------------------------------
# The tokenized cache


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what decides how a tokenizer turns records into ids: its vocabulary and
    merges (the fast tokenizer's serialized state), chat template and eos token."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary is what we can see of it
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, getattr(tokenizer, "chat_template", None),
                         tokenizer.eos_token, tokenizer.eos_token_id],
                        default=str).encode())
    return h.hexdigest()


def cache_key(file_sha256: str, tokenizer_digest: str, max_seq_len: int) -> str:
    h = hashlib.sha256(file_sha256.encode())
    h.update(f"|{tokenizer_digest}|{max_seq_len}".encode())
    return h.hexdigest()[:32]


class _CachedDataset(msgspec.Struct, array_like=True):
    format: str
    truncated: int
    tokens: int
    loss_tokens: int
    input_ids: list[list[int]]
    labels: list[list[int]]


class TokenizedCache:
    """Tokenized datasets on disk, one msgpack file per key (``<root>/<key>.msgpack``).

    Entries are written whole (to a temporary name, then renamed) so a reader never sees half
    of one; an entry that cannot be read is a miss, logged."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._decoder = msgspec.msgpack.Decoder(_CachedDataset)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.msgpack"

    def get(self, key: str, path: Path) -> tuple[list[Example], DatasetReport] | None:
        try:
            entry = self._decoder.decode(self.path(key).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as e:
            logger.warning("%s: tokenized cache entry %s unreadable (%s); tokenizing again",
                           path, self.path(key), e)
            return None
        examples = [Example(ids, labels) for ids, labels in zip(entry.input_ids, entry.labels,
                                                                 strict=True)]
        report = DatasetReport(path=str(path), format=entry.format, records=len(examples),
                               truncated=entry.truncated, tokens=entry.tokens,
                               loss_tokens=entry.loss_tokens, cache_key=key, source="cache")
        return examples, report

    def put(self, key: str, examples: Sequence[Example], report: DatasetReport) -> None:
        entry = _CachedDataset(format=report.format, truncated=report.truncated,
                               tokens=report.tokens, loss_tokens=report.loss_tokens,
                               input_ids=[e.input_ids for e in examples],
                               labels=[e.labels for e in examples])
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # Unique per thread: two attach workers may write the same dataset's entry.
            tmp = self.path(key).with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
            tmp.write_bytes(msgspec.msgpack.encode(entry))
            os.replace(tmp, self.path(key))
        except OSError as e:  # the job still runs: the finetune tokenizes the file itself
            logger.warning("%s: cannot write the tokenized cache entry %s (%s)",
                           report.path, self.path(key), e)

    def prune(self, keep: set[str]) -> int:
        """Remove the entries whose key is not in ``keep``; returns how many went."""
        removed = 0
        for f in self.root.glob("*.msgpack"):
            if f.stem not in keep:
                f.unlink(missing_ok=True)
                removed += 1
        return removed


def load_dataset(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
    cache: TokenizedCache | None = None, limits: DatasetLimits = DatasetLimits(),
    cancel: threading.Event | None = None,
) -> tuple[list[Example], DatasetReport]:
    """Read, check and tokenize a JSONL dataset; raises :class:`DatasetError` on a bad file.

    With a ``cache``, the examples come from it when this file (its bytes), tokenizer and
    ``max_seq_len`` were tokenized before, and go into it when they were not. Only regular files
    within ``limits`` are read; setting ``cancel`` stops a read or tokenization in progress with
    :class:`DatasetCancelled`."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be at least 1, got {max_seq_len}")
    path = Path(path)
    tok_digest = tokenizer_fingerprint(tokenizer)
    if cache is not None:
        # A first pass only hashes the file, so a cache hit never parses it.
        hit = cache.get(cache_key(file_digest(path, limits, cancel), tok_digest, max_seq_len),
                        path)
        if hit is not None:
            return hit
    # The key is what this pass read, whatever the file held at the first.
    digest = hashlib.sha256()
    examples: list[Example] = []
    truncated = tokens = loss_tokens = 0
    fmt = ""
    for i, (lineno, record, fmt) in enumerate(iter_records(path, limits, cancel, digest)):
        if i % 256 == 0:
            _check_cancel(cancel, path)
        example, cut = tokenize_record(
            record, fmt, tokenizer, max_seq_len, where=f"{path}:{lineno}"
        )
        examples.append(example)
        truncated += cut
        tokens += len(example.input_ids)
        # Only labels after the first token count: a causal LM predicts token i from the ones
        # before it, so a label on the first token is never trained on.
        loss_tokens += sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)
    key = cache_key(digest.hexdigest(), tok_digest, max_seq_len)
    if truncated:
        logger.warning(
            "%s: %d of %d records are longer than max_seq_len=%d tokens and were truncated",
            path, truncated, len(examples), max_seq_len,
        )
    report = DatasetReport(
        path=str(path), format=fmt, records=len(examples), truncated=truncated,
        tokens=tokens, loss_tokens=loss_tokens, cache_key=key,
    )
    if cache is not None:
        cache.put(key, examples, report)
    logger.info(
        "%s: %d %s records, %d tokens (%d with loss)",
        path, report.records, fmt, tokens, loss_tokens,
    )
    return examples, report
