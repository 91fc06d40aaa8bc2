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

import array
import dataclasses
import hashlib
import json
import logging
import os
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, overload

# What reads and checks a file, record by record; here too for the modules that tokenize.
from harli.dataset_records import (
    CHAT_ROLES,
    FORMATS,
    UPLOAD_SUFFIX,
    UPLOAD_TEMP_PREFIX,
    DatasetCancelled,
    DatasetError,
    DatasetLimits,
    JsonlSummary,
    Progress,
    _check_cancel,
    check_jsonl,
    detect_format,
    file_digest,
    iter_records,
    read_jsonl,
    scan_jsonl,
    upload_path,
)

__all__ = [
    "CHAT_ROLES", "FORMATS", "IGNORE_INDEX", "SAMPLE_DATASET", "UPLOAD_SUFFIX",
    "UPLOAD_TEMP_PREFIX", "DatasetCancelled", "DatasetError", "DatasetLimits", "DatasetReport",
    "Example", "JsonlSummary", "MappedExamples", "TokenizedCache", "alpaca_prompt", "cache_key",
    "check_jsonl", "default_chat_render", "detect_format", "file_digest", "iter_records",
    "load_dataset", "read_jsonl", "scan_jsonl", "tokenize_record", "tokenize_to_cache",
    "tokenizer_fingerprint", "upload_path",
]

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# The small dataset shipped with harli (alpaca records: number words -> digits), used by the
# demo, the benchmarks and the profiler as the representative job.
SAMPLE_DATASET = Path(__file__).resolve().parent / "data" / "digits.jsonl"

IGNORE_INDEX = -100
DEFAULT_EOS_TEXT = "<|eos|>"


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


# An entry's file: a header, then every example's input ids and labels (int32, the ids of
# example i then its labels), then n + 1 offsets (int64, in tokens: example i has
# offsets[i + 1] - offsets[i] of each), then the report's numbers as JSON.
_MAGIC = b"HARLITOK"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ")  # magic, version, reserved, examples, offsets at, meta at
_SUFFIX = ".tokens"


class _CacheWriter:
    """One entry being written, an example at a time; it becomes visible only at ``commit``
    (written to a temporary name, then renamed), so a reader never sees half of one. A write
    that fails (a full disk) is logged once and the entry dropped: the finetune then tokenizes
    the file itself."""

    def __init__(self, cache: TokenizedCache, source: Path) -> None:
        self.cache = cache
        self.source = source
        self.offsets = array.array("q", [0])
        # Unique per process and thread: two validations may write the same dataset's entry.
        self.tmp = cache.root / f".tmp-{os.getpid()}-{threading.get_ident()}{_SUFFIX}"
        self._f: BinaryIO | None = None
        try:
            cache.root.mkdir(parents=True, exist_ok=True)
            self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
            self._f.write(bytes(_HEADER.size))
        except OSError as e:
            self._failed(e)

    def add(self, example: Example) -> None:
        self.offsets.append(self.offsets[-1] + len(example.input_ids))
        if self._f is None:
            return
        tokens = array.array("i", example.input_ids)
        tokens.extend(example.labels)
        try:
            self._f.write(tokens.tobytes())
        except OSError as e:
            self._failed(e)

    def commit(self, key: str, report: DatasetReport) -> None:
        """Make the entry ``key`` visible (unless writing it failed: logged)."""
        if self._f is None:
            return
        f = self._f
        try:
            offsets_at = f.tell()
            f.write(self.offsets.tobytes())
            meta_at = f.tell()
            f.write(json.dumps({"format": report.format, "truncated": report.truncated,
                                "tokens": report.tokens,
                                "loss_tokens": report.loss_tokens}).encode())
            f.seek(0)
            f.write(_HEADER.pack(_MAGIC, _VERSION, 0, len(self.offsets) - 1, offsets_at,
                                 meta_at))
            f.close()
            self._f = None
            os.replace(self.tmp, self.cache.path(key))
        except OSError as e:
            self._failed(e)

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self.tmp.unlink(missing_ok=True)

    def _failed(self, e: OSError) -> None:
        logger.warning("%s: cannot write the tokenized cache entry in %s (%s); the finetune "
                       "will tokenize the file itself", self.source, self.cache.root, e)
        self.abort()


class MappedExamples(Sequence[Example]):
    """The examples of a cache entry, read from its memory-mapped file as they are indexed:
    a dataset of any size costs the reader the pages it touches."""

    def __init__(self, tokens: Any, offsets: Any) -> None:
        self._tokens = tokens  # numpy int32 memmap: ids then labels of each example
        self._offsets = offsets  # numpy int64, n + 1

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> Example: ...

    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...

    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        n = end - start
        row = self._tokens[2 * start:2 * end]
        return Example(row[:n].tolist(), row[n:].tolist())


class TokenizedCache:
    """Tokenized datasets on disk, one file per key (``<root>/<key>.tokens``), written an
    example at a time and read through a memory map: neither the validation that writes an
    entry nor the finetune that reads it holds the dataset's tokens in memory. An entry that
    cannot be read is a miss, logged."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / f"{key}{_SUFFIX}"

    def writer(self, source: Path) -> _CacheWriter:
        return _CacheWriter(self, source)

    def _open(self, key: str, path: Path) -> tuple[tuple[int, int], DatasetReport] | None:
        """The entry's (examples, where its offsets start) and its report; None: a miss."""
        try:
            with open(self.path(key), "rb") as f:
                magic, version, _, n, offsets_at, meta_at = _HEADER.unpack(f.read(_HEADER.size))
                if magic != _MAGIC or version != _VERSION:
                    raise ValueError(f"not a version-{_VERSION} entry")
                f.seek(meta_at)
                meta = json.loads(f.read())
            report = DatasetReport(path=str(path), format=meta["format"], records=n,
                                   truncated=meta["truncated"], tokens=meta["tokens"],
                                   loss_tokens=meta["loss_tokens"], cache_key=key,
                                   source="cache")
            return (n, offsets_at), report
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, struct.error) as e:
            logger.warning("%s: tokenized cache entry %s unreadable (%s); tokenizing again",
                           path, self.path(key), e)
            return None

    def report(self, key: str, path: Path) -> DatasetReport | None:
        """The entry's report (its examples left on disk); None: a miss."""
        found = self._open(key, path)
        return None if found is None else found[1]

    def get(self, key: str, path: Path) -> tuple[MappedExamples, DatasetReport] | None:
        import numpy as np

        found = self._open(key, path)
        if found is None:
            return None
        (n, offsets_at), report = found
        offsets = np.fromfile(self.path(key), dtype="<i8", count=n + 1, offset=offsets_at)
        total = int(offsets[-1])
        tokens = np.memmap(self.path(key), dtype="<i4", mode="r", offset=_HEADER.size,
                           shape=(2 * total,)) if total else np.zeros(0, dtype="<i4")
        return MappedExamples(tokens, offsets), report

    def prune(self, keep: set[str]) -> int:
        """Remove the entries whose key is not in ``keep`` (and those of an older layout);
        returns how many went."""
        removed = 0
        for f in self.root.glob("*"):
            if f.is_file() and not f.name.startswith(".tmp-") and (
                    f.suffix != _SUFFIX or f.stem not in keep):
                f.unlink(missing_ok=True)
                removed += 1
        return removed


def _tokenize(path: Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
              limits: DatasetLimits, cancel: threading.Event | None, emit: Callable[[Example],
                                                                                   None],
              progress: Progress | None = None) -> tuple[DatasetReport, str]:
    """Tokenize every record of ``path``, handing each example to ``emit``; returns the report
    (no cache key yet) and the sha256 of the bytes read."""
    digest = hashlib.sha256()
    records = truncated = tokens = loss_tokens = 0
    fmt = ""
    for lineno, record, fmt in iter_records(path, limits, cancel, digest, progress):
        if records % 256 == 0:
            _check_cancel(cancel, path)
        example, cut = tokenize_record(
            record, fmt, tokenizer, max_seq_len, where=f"{path}:{lineno}"
        )
        emit(example)
        records += 1
        truncated += cut
        tokens += len(example.input_ids)
        # Only labels after the first token count: a causal LM predicts token i from the ones
        # before it, so a label on the first token is never trained on.
        loss_tokens += sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)
    if truncated:
        logger.warning(
            "%s: %d of %d records are longer than max_seq_len=%d tokens and were truncated",
            path, truncated, records, max_seq_len,
        )
    report = DatasetReport(path=str(path), format=fmt, records=records, truncated=truncated,
                           tokens=tokens, loss_tokens=loss_tokens)
    logger.info("%s: %d %s records, %d tokens (%d with loss)", path, records, fmt, tokens,
                loss_tokens)
    return report, digest.hexdigest()


def tokenize_to_cache(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
    cache: TokenizedCache, limits: DatasetLimits = DatasetLimits(),
    cancel: threading.Event | None = None, progress: Progress | None = None,
    file_sha256: str | None = None,
) -> DatasetReport:
    """Read, check and tokenize a JSONL dataset into ``cache``, an example at a time, holding
    none of them in memory; raises :class:`DatasetError` on a bad file. An entry already
    there for these bytes, tokenizer and ``max_seq_len`` is used as it is (``file_sha256``:
    the bytes' hash, when the caller has just read them)."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be at least 1, got {max_seq_len}")
    path = Path(path)
    tok_digest = tokenizer_fingerprint(tokenizer)
    sha = file_sha256 or file_digest(path, limits, cancel)
    hit = cache.report(cache_key(sha, tok_digest, max_seq_len), path)
    if hit is not None:
        return hit
    writer = cache.writer(path)
    try:
        report, file_sha = _tokenize(path, tokenizer, max_seq_len, limits, cancel, writer.add,
                                     progress)
    except BaseException:
        writer.abort()
        raise
    key = cache_key(file_sha, tok_digest, max_seq_len)
    report = dataclasses.replace(report, cache_key=key)
    writer.commit(key, report)
    return report


def load_dataset(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int,
    cache: TokenizedCache | None = None, limits: DatasetLimits = DatasetLimits(),
    cancel: threading.Event | None = None,
) -> tuple[Sequence[Example], DatasetReport]:
    """Read, check and tokenize a JSONL dataset; raises :class:`DatasetError` on a bad file.

    With a ``cache``, the examples come from it (memory-mapped) when this file (its bytes),
    tokenizer and ``max_seq_len`` were tokenized before, and go into it when they were not.
    Only regular files within ``limits`` are read; setting ``cancel`` stops a read or
    tokenization in progress with :class:`DatasetCancelled`."""
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
    examples: list[Example] = []
    writer = cache.writer(path) if cache is not None else None

    def emit(example: Example) -> None:
        examples.append(example)
        if writer is not None:
            writer.add(example)

    try:
        report, file_sha = _tokenize(path, tokenizer, max_seq_len, limits, cancel, emit)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    # The key is what this pass read, whatever the file held at the first.
    key = cache_key(file_sha, tok_digest, max_seq_len)
    report = dataclasses.replace(report, cache_key=key)
    if writer is not None:
        writer.commit(key, report)
    return examples, report
