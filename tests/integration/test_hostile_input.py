"""Hostile values in every field of every message, sent to the real daemon.

Every field of every control and inference message (enumerated from their msgspec structs, so a
field added tomorrow is covered tomorrow) and every field of every HTTP request body
(enumerated from the pydantic models of ``http_proc``, and Harli's job options under ``harli``
from ``JobSpec``), every id in a URL and every part of an upload gets the values a careless or
hostile client sends: NUL bytes; text that is no text (invalid UTF-8 in a MessagePack str,
built by hand since a Python str cannot hold it; a lone surrogate, ``"\\ud800"``, in JSON); a
300-byte path component; 64 KiB strings; 2^70 (over MessagePack, which carries 64 bits, the
64-bit edges and 2.0^70 as a float), -1 and other negatives; NaN and the infinities; wrong
types; empty strings. Each is answered with a typed error (an ``Error`` whose code names a
refusal, never ``internal``; an OpenAI error object with a 4xx status) or with a correct
answer (a value outside what the field documents is never accepted), and the daemon serves on:
its pid alive after every value, and every few values and after every field no child
restarted and a generation and ``GET /health`` succeed.

``test_*_edges`` send each field each edge of its type, once each (hypothesis enumerates a
finite ``sampled_from`` exhaustively); ``test_*_random`` change a few fields at once to random
values. Derandomized and without shrinking: the same messages every run, and a failure reports
the value as sent. test_fuzz.py sends random frames; this file goes field by field.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import secrets
import struct
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.lora.protocol import (
    LoadLoRAAdapterRequest as LoadLoraAdapterRequest,
)
from vllm.entrypoints.serve.lora.protocol import (
    UnloadLoRAAdapterRequest as UnloadLoraAdapterRequest,
)

from harli.bench.local_daemon import LocalDaemon
from harli.client.control import ControlClient
from harli.datasets import SAMPLE_DATASET
from harli.http_proc.fine_tuning_objects import _SET_BY as SET_BY_OPENAI
from harli.http_proc.fine_tuning_objects import FineTuningJobRequest
from harli.ipc import control as ctl
from harli.ipc.control import ControlReply, ControlRequest
from harli.ipc.inference import Chunk, ClientMessage, Error, ErrorCode, ServerMessage
from harli.ipc.jobs import JobSpec

from .conftest import free_port, make_daemon, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

LINES = SAMPLE_DATASET.read_bytes().splitlines(keepends=True)[:48]
DATASET = b"".join(LINES)
# A job's options small enough that one that gets to run trains a step or two.
SMALL_JOB: dict[str, Any] = {"max_steps": 1, "max_seq_len": 64, "micro_batch_size": 4}
# Refusals: the codes a hostile value may get. ``internal`` (an exception the daemon did not
# expect), ``decode_died``, ``unavailable`` and ``timeout`` are never an answer to bad input.
REFUSALS = {ErrorCode.MALFORMED, ErrorCode.UNKNOWN_TYPE, ErrorCode.INVALID, ErrorCode.TOO_LARGE,
            ErrorCode.PROTOCOL_VERSION, ErrorCode.DUPLICATE_REQUEST, ErrorCode.UNKNOWN_REQUEST,
            ErrorCode.REJECTED, ErrorCode.UNKNOWN_MODEL, ErrorCode.NOT_FOUND,
            ErrorCode.CONFLICT}
JOB_STATES = {"validating_files", "queued", "running", "paused", "held", "succeeded", "failed",
              "cancelled"}
# A policy as docs/scheduler.md writes them (case and surrounding spaces aside).
POLICY = re.compile(r"harli|harli:strict|harli:max|naive|decode-only|static:[0-9]+")
# String fields that name files: they get path edges too, and must be a path to be accepted.
PATH_FIELDS = {"dataset", "validation_file", "output_dir", "base_model", "path", "lora_path"}
NAME_MAX, PATH_MAX = 255, 4095  # bytes: a path component, a whole path (Linux)
FULL_CHECK_EVERY = 10  # examples between two generate + /health checks (and after each test)

EDGES = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                 phases=[Phase.explicit, Phase.generate],
                 suppress_health_check=list(HealthCheck))


def random_settings(n: int) -> settings:
    return settings(EDGES, max_examples=n)


# -- values -------------------------------------------------------------------------------------


class RawStr(bytes):
    """Bytes sent as a MessagePack *str*: how invalid UTF-8 gets into a str-typed field."""


class RawJson(str):
    """JSON text sent as it is (``1e400``, deep nesting): what ``json.dumps`` will not write."""


class Edge:
    """A hostile value with a short name, so that hypothesis prints the name, not 64 KiB."""

    def __init__(self, value: Any, name: str | None = None) -> None:
        self.value = value
        self.name = name or short(value)

    def __repr__(self) -> str:
        return self.name


def short(v: Any, n: int = 70) -> str:
    text = ascii(v)
    return text if len(text) <= n else f"{text[:n]}...({len(text)} chars)"


def _head(n: int, fixed: int, fixed_max: int, wide: bytes) -> bytes:
    """A MessagePack header: the fix form below ``fixed_max``, else 8/16/32-bit lengths (str
    only has the 8-bit one: ``wide`` lists the type bytes of the forms it has)."""
    if n < fixed_max:
        return bytes([fixed | n])
    sizes = [(256, ">B"), (65536, ">H"), (2**32, ">I")][3 - len(wide):]
    for (limit, fmt), code in zip(sizes, wide, strict=True):
        if n < limit:
            return bytes([code]) + struct.pack(fmt, n)
    raise ValueError(n)


def pack(v: Any) -> bytes:
    """MessagePack of ``v``, with ``RawStr`` written as a str of those bytes."""
    if isinstance(v, RawStr):
        return _head(len(v), 0xA0, 32, b"\xd9\xda\xdb") + bytes(v)
    if isinstance(v, dict):
        return _head(len(v), 0x80, 16, b"\xde\xdf") + b"".join(pack(k) + pack(x)
                                                               for k, x in v.items())
    if isinstance(v, list):
        return _head(len(v), 0x90, 16, b"\xdc\xdd") + b"".join(pack(x) for x in v)
    return msgspec.msgpack.encode(v)


def to_json(body: Any) -> bytes:
    """JSON of ``body`` as a client writes it: ``ensure_ascii`` writes a lone surrogate as
    ``\\ud800``, NaN and the infinities as Python's ``json`` reads them; ``RawJson`` as is."""
    raws: dict[str, str] = {}

    def swap(v: Any) -> Any:
        if isinstance(v, RawJson):
            key = f"\x01raw{len(raws)}\x01"
            raws[json.dumps(key)] = str(v)
            return key
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(body))
    for key, raw in raws.items():
        text = text.replace(key, raw)
    return text.encode()


def set_in(base: Any, path: tuple[str | int, ...], value: Any) -> Any:
    """A deep copy of ``base`` with ``value`` at ``path``, containers made on the way."""
    out = copy.deepcopy(base)
    node = out
    for i, key in enumerate(path):
        last = i == len(path) - 1
        nxt: Any = None if last else ([] if isinstance(path[i + 1], int) else {})
        if isinstance(key, int):
            while len(node) <= key:
                node.append(nxt)
            if last:
                node[key] = value
            elif not isinstance(node[key], type(nxt)):
                node[key] = nxt
            node = node[key]
        else:
            if last:
                node[key] = value
            elif not isinstance(node.get(key), type(nxt)):
                node[key] = nxt
            node = node[key]
    return out


# -- fields -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One place a value goes: its path in the message and the kinds of value it takes."""

    owner: str  # the message (struct, route) it belongs to
    path: tuple[str | int, ...]
    kinds: frozenset[str]  # str, path, int, float, bool, list, map, literal, any, extra
    optional: bool = False  # None is a valid value (not sent as hostile)
    spec: Any = None  # the msgspec type it decodes as (constraints), where known

    def __str__(self) -> str:
        return f"{self.owner}.{'.'.join(map(str, self.path)) or '<message>'}"


def _kind(t: Any, name: str) -> str:
    kinds: dict[type[Any], str] = {msgspec.inspect.StrType: "str", msgspec.inspect.IntType: "int",
             msgspec.inspect.FloatType: "float", msgspec.inspect.BoolType: "bool",
             msgspec.inspect.LiteralType: "literal", msgspec.inspect.ListType: "list",
             msgspec.inspect.StructType: "map", msgspec.inspect.DictType: "map"}
    kind = kinds.get(type(t), "any")
    return "path" if kind == "str" and name in PATH_FIELDS else kind


def struct_fields(owner: str, cls: type[Any], prefix: tuple[str | int, ...] = ()) -> list[Field]:
    """Every field of a msgspec struct, nested structs and list items included."""
    out = []
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    for f in info.fields:
        members = (f.type.types if isinstance(f.type, msgspec.inspect.UnionType)
                   else (f.type,))
        optional = any(isinstance(m, msgspec.inspect.NoneType) for m in members)
        real = [m for m in members if not isinstance(m, msgspec.inspect.NoneType)]
        path = (*prefix, f.encode_name)
        out.append(Field(owner, path, frozenset(_kind(m, f.name) for m in real), optional,
                         real[0] if len(real) == 1 else None))
        for m in real:
            if isinstance(m, msgspec.inspect.StructType):
                out += struct_fields(owner, m.cls, path)
            elif isinstance(m, msgspec.inspect.ListType):
                out.append(Field(owner, (*path, 0), frozenset({_kind(m.item_type, f.name)}),
                                 spec=m.item_type))
    return out


def _annotation_kinds(a: Any, name: str) -> tuple[set[str], list[Any], list[type[BaseModel]]]:
    """(kinds, list item annotations, nested models) of a pydantic annotation."""
    origin, args = typing.get_origin(a), typing.get_args(a)
    if origin is typing.Annotated:
        return _annotation_kinds(args[0], name)
    if origin in (typing.Union, types.UnionType):
        kinds: set[str] = set()
        items: list[Any] = []
        models: list[type[BaseModel]] = []
        for m in args:
            k, i, md = _annotation_kinds(m, name)
            kinds |= k
            items += i
            models += md
        return kinds, items, models
    if origin is list:
        return {"list"}, [args[0]], []
    if origin is dict:
        return {"map"}, [], []
    if origin is typing.Literal:
        return {"literal"}, [], []
    if isinstance(a, type) and issubclass(a, BaseModel):
        return {"map"}, [], [a]
    simple = {str: "path" if name in PATH_FIELDS else "str", int: "int", float: "float",
              bool: "bool", type(None): "none"}
    return {simple.get(a, "any")}, [], []


def model_fields(owner: str, model: type[BaseModel],
                 prefix: tuple[str | int, ...] = ()) -> list[Field]:
    """Every field of a pydantic request model, nested models and list items included."""
    out = []
    for name, info in model.model_fields.items():
        kinds, items, models = _annotation_kinds(info.annotation, name)
        path = (*prefix, name)
        out.append(Field(owner, path, frozenset(kinds - {"none"}), "none" in kinds))
        for m in models:
            out += model_fields(owner, m, path)
        for item in items:
            ik, _, im = _annotation_kinds(item, name)
            out.append(Field(owner, (*path, 0), frozenset(ik - {"none"})))
            for m in im:
                out += model_fields(owner, m, (*path, 0))
    return out


def _union(*lists: list[Field]) -> list[Field]:
    """One field per path (``prompt.0`` is a str, an int or a list of ints), kinds merged."""
    seen: dict[tuple[str | int, ...], Field] = {}
    for f in (f for fs in lists for f in fs):
        was = seen.get(f.path)
        seen[f.path] = f if was is None else Field(
            was.owner, was.path, was.kinds | f.kinds, was.optional or f.optional,
            was.spec or f.spec)
    return list(seen.values())


CONTROL_TYPES: tuple[type[Any], ...] = typing.get_args(ControlRequest)
INFERENCE_TYPES: tuple[type[Any], ...] = typing.get_args(ClientMessage)


def _tag(cls: type[Any]) -> str:
    return str(cls.__struct_config__.tag)


def message_fields(types: tuple[type[Any], ...]) -> list[Field]:
    out = []
    for cls in types:
        out += struct_fields(cls.__name__, cls)
        out.append(Field(cls.__name__, (), frozenset({"extra"})))  # keys it does not know
    return out


CONTROL_FIELDS = message_fields(CONTROL_TYPES)
INFERENCE_FIELDS = message_fields(INFERENCE_TYPES)
# Harli's job options: every JobSpec field but those the OpenAI fields set.
_HARLI_FIELDS = [f for f in struct_fields("fine_tuning_jobs", JobSpec, ("harli",))
                 if f.path[1] not in SET_BY_OPENAI]


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    path: str
    fields: list[Field]


JSON_ROUTES = [
    Route("completions", "POST", "/v1/completions",
          _union(model_fields("completions", CompletionRequest))),
    Route("chat", "POST", "/v1/chat/completions",
          _union(model_fields("chat", ChatCompletionRequest))),
    Route("fine_tuning_jobs", "POST", "/v1/fine_tuning/jobs",
          _union(model_fields("fine_tuning_jobs", FineTuningJobRequest), _HARLI_FIELDS)),
    Route("load_lora_adapter", "POST", "/v1/load_lora_adapter",
          model_fields("load_lora_adapter", LoadLoraAdapterRequest)),
    Route("unload_lora_adapter", "POST", "/v1/unload_lora_adapter",
          model_fields("unload_lora_adapter", UnloadLoraAdapterRequest)),
]
HTTP_FIELDS = [f for r in JSON_ROUTES for f in r.fields] + [
    Field(r.name, (), frozenset({"body"})) for r in JSON_ROUTES]
ROUTE_OF = {r.name: r for r in JSON_ROUTES}
ID_ROUTES = [("GET", "/v1/fine_tuning/jobs/{}"), ("POST", "/v1/fine_tuning/jobs/{}/cancel"),
             ("POST", "/v1/fine_tuning/jobs/{}/pause"), ("POST", "/v1/fine_tuning/jobs/{}/resume"),
             ("GET", "/v1/fine_tuning/jobs/{}/events"),
             ("GET", "/v1/fine_tuning/jobs/{}/checkpoints"), ("GET", "/v1/files/{}"),
             ("GET", "/v1/files/{}/content"), ("DELETE", "/v1/files/{}")]
QUERY_ROUTES = [("/v1/files", ("limit", "after", "order", "purpose")),
                ("/v1/fine_tuning/jobs", ("limit", "after")),
                ("/v1/fine_tuning/jobs/{job}/events", ("limit", "after")),
                ("/v1/fine_tuning/jobs/{job}/checkpoints", ("limit", "after"))]
UPLOAD_PARTS = ("purpose", "filename", "file")


# -- edges --------------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
BAD_UTF8 = [RawStr(b"\xed\xa0\x80"), RawStr(b"ok\xff")]  # a surrogate as UTF-8; a stray byte
LONE = ["\ud800", "a\udfffb"]  # JSON "\ud800": Python reads it, no text holds it


# Fields with a grammar of their own get its near misses too.
GRAMMAR_EDGES: dict[str, list[Any]] = {
    "SetPolicy.policy": ["static:١", "static:99", " NAIVE ", "static:2\n", "harli:\x00",
                         "static:", "static:2:3"],
}


def edges(f: Field, tmp: Path, flavor: str) -> list[Edge]:
    """The hostile values of field ``f``'s kinds, as MessagePack (``flavor`` "msgpack") or
    JSON ("json") carries them; None only where it is not a valid value."""
    mp = flavor == "msgpack"
    huge_int = [2**64 - 1, 2**63, -(2**63), 2.0**70] if mp else [2**63, 2**64, 2**70, -(2**70)]
    not_text = BAD_UTF8 if mp else LONE
    wrong: list[Any] = [0, -1, huge_int[0], NAN, True, [], {}]
    out: list[Any] = []
    for kind in sorted(f.kinds):
        if kind in ("str", "path"):
            out += ["", "\x00", "a\x00b", "x" * 65536, f"{tmp}/{'a' * 300}", "name\n", "١٢",
                    "../../../etc/passwd", *not_text, *wrong]
        if kind == "path":
            out += ["/dev/zero", "/", "relative/x", "~/x", f"{tmp}/a\x00b", "/" + "a/" * 2100,
                    f"{tmp}/missing.jsonl"]
        if kind == "int":
            out += [-1, 0, 1, 2**63 - 1, *huge_int, 10**7, 1.5, NAN, INF, "1", True, [],
                    *([] if mp else [RawJson("1e400")])]
        if kind == "float":
            out += [NAN, INF, -INF, -1.0, -0.0, 0.0, 5e-324, 1e308, 2**64 - 1, "1.0", True, []]
        if kind == "bool":
            out += [0, 1, 2, "true", "", [], 1.0]
        if kind == "literal":
            out += ["", "CONSTANT", "constant\x00", "x" * 65536, 1, *not_text]
        if kind == "list":
            out += [[], "x", 5, {}, ["x"] * 1000, [0] * 10000, [[[]]]]
        if kind == "map":
            out += [5, "x", [], {}, {"x" * 300: 1}, {"\x00": 1}, {"k": "v" * 65536}]
        if kind == "any":
            out += ["\x00", "x" * 65536, 2**63 - 1, NAN, [], {}, *not_text]
        if kind == "extra":  # merged into the message: keys it does not know
            out += [{"\x00": 1}, {"x" * 300: 1}, {"request_idx": "r"}, {BAD_UTF8[1]: 1}]
    out += GRAMMAR_EDGES.get(str(f), [])
    if not f.optional and not f.kinds & {"extra", "body"}:
        out.append(None)
    seen: dict[str, Edge] = {}
    for v in out:
        key = f"{type(v).__name__}:{v!r}"
        seen.setdefault(key, Edge(v))
    return list(seen.values())


def body_edges() -> list[Edge]:
    """Whole JSON bodies that are not the object a route takes."""
    return [Edge(RawJson(x), name) for x, name in (
        ("[]", "[]"), ('"x"', '"x"'), ("null", "null"), ("5", "5"), ("{}", "{}"),
        ("[" * 100_000 + "]" * 100_000, "100000 nested lists"),
        ('{"\\ud800": 1}', "a lone surrogate key"), ("NaN", "NaN"), ("{", "{"),
        ('{"a": 1, "a": 2}', "a key twice"))] + [Edge(b"\xff\xfe\x00", "not UTF-8")]


def id_edges() -> list[Edge]:
    """Path segments that name no job and no file (percent-encoded as sent)."""
    return [Edge(x) for x in (
        "ftjob-0", "ftjob--1", "ftjob-" + "9" * 19, f"ftjob-{2**70}", "ftjob-²", "ftjob-١",
        "ftjob-01", "ftjob-1%0A", "ftjob-1%00", "%00", "%ED%A0%80", "%FF", "a" * 300, "x" * 8000,
        "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "file-" + "a" * 65, "file-abc%0A", "file-%00",
        "file-١", " ftjob-1")]


def query_edges() -> list[Edge]:
    return [Edge(x) for x in ("0", "-1", "101", "10001", str(2**70), f"-{2**70}", "nan", "1e3",
                              "", "١", "%00", "%ED%A0%80", "x" * 4000, "ftjob-0", "file-x")]


def upload_edges(part: str) -> list[Edge]:
    common = [b"", b"\x00", b"a\x00b", b"\xed\xa0\x80", b"\xff\xfe", b"x" * 65536, b"a" * 300,
              b"../../../etc/passwd", b'"', b"\\", b"a\r\nContent-Type: text/x"]
    if part == "file":
        common += [b"\x00\n", b'{"prompt": "\\ud800", "completion": "x"}\n',
                   b'{"text": "' + b"a" * 65536 + b'"}\n', b'{"text": 1180591620717411303424}\n',
                   b'{"text": NaN}\n', b"[" * 100_000 + b"\n", b"\xff\xfe\n",
                   b'{"messages": [{"role": "\\u0000", "content": "x"}]}\n',
                   b'{"prompt": "' + b"a" * 300 + b'", "completion": ""}\n', b"{}\n" * 5000]
    return [Edge(x) for x in common]


# -- what may be accepted -----------------------------------------------------------------------


def not_a_path(v: Any) -> bool:
    """A string no file can be named by: a NUL, not text, a component over NAME_MAX bytes or
    a whole over PATH_MAX ("" is no path either, but means "none" or "the default")."""
    if not isinstance(v, str) or not v:
        return False
    try:
        raw = v.encode()
    except UnicodeEncodeError:
        return True
    return b"\x00" in raw or len(raw) > PATH_MAX or any(len(p) > NAME_MAX
                                                        for p in raw.split(b"/"))


def outside(f: Field, v: Any, h: Harness) -> str | None:
    """Why the field documents ``v`` as out of range although its decoder may take it, or
    None. What a msgspec or pydantic type refuses needs no rule here."""
    assert h.daemon is not None
    t = f.spec
    if isinstance(t, msgspec.inspect.StrType) and isinstance(v, str) and t.pattern \
            and not re.fullmatch(t.pattern, v):
        return f"does not match {t.pattern}"
    if f.kinds == {"path"} and not_a_path(v):
        return f"names no file (a NUL, not text, over {NAME_MAX} bytes a component)"
    if f.path[-1:] == ("max_seq_len",) and isinstance(v, int) and v > h.max_model_len:
        return f"over the model's context of {h.max_model_len}"
    levels = h.daemon.cfg.finetune.levels
    if str(f) == "SetLevel.level" and isinstance(v, int) and not 0 <= v <= levels:
        return f"not a quota level (0..{levels})"
    if str(f) == "SetPolicy.policy" and isinstance(v, str) \
            and not POLICY.fullmatch(v.strip().lower()):
        return "not a policy as documented"
    return None


# -- the daemon ---------------------------------------------------------------------------------


@dataclass
class Harness:
    """One daemon with its HTTP front, and what the tests send it."""

    root: Path
    tiny_model: Path
    adapter: Path
    daemon: LocalDaemon | None = None
    model: str = ""  # the base model's name
    max_model_len: int = 0
    job_id: int = 0  # a job (cancelled) that messages with a job id name
    file_id: str = ""  # an uploaded file, likewise
    policy: tuple[str, float] = ("static:2", 0.0)  # the daemon's, restored after a change
    restarts: dict[str, int] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)  # since the last full check
    http: httpx.Client | None = None
    _ctl: zmq.Socket[bytes] | None = None
    _inf: zmq.Socket[bytes] | None = None
    starts: int = 0
    upload: Path = Path("/nonexistent")  # the file the last AddFile registers

    @property
    def dataset(self) -> Path:
        return self.root / "small.jsonl"

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.starts += 1
        port = free_port()
        self.daemon = make_daemon(self.root / f"d{self.starts}", self.tiny_model,
                                  f"http.port={port}")
        self.daemon.start()
        try:
            self._setup(f"http://127.0.0.1:{port}")
        except BaseException:
            self.stop()
            raise

    def _setup(self, base: str) -> None:
        """What the messages refer to: the served model, a job, an uploaded file."""
        assert self.daemon is not None
        self.daemon.wait_ready()
        wait_http(base, self.daemon)
        # Connection: close, so that a connection the front drops is seen by the request
        # that caused it, not by the next one on a kept-alive connection.
        self.http = httpx.Client(base_url=base, timeout=120, headers={"Connection": "close"})
        self.model = next(m["id"] for m in self.http.get("/v1/models").json()["data"]
                          if m["parent"] is None)
        with self.daemon.client(timeout_s=60) as c:
            self.max_model_len = c.hello().max_model_len
        self.dataset.write_bytes(DATASET)
        with self.control() as c:
            st = c.status()
            assert st.scheduler is not None
            self.policy = (st.scheduler.policy, st.scheduler.tpot_slo_ms)
            job = c.attach(JobSpec(name=f"base-{secrets.token_hex(4)}",
                                   dataset=str(self.dataset), **SMALL_JOB))
            self.job_id = job.job_id
            c.cancel(job.job_id)
        r = self.http.post("/v1/files", files={"file": ("d.jsonl", DATASET)},
                           data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        self.file_id = r.json()["id"]
        self.restarts = self.children()

    def stop(self) -> None:
        for s in (self._ctl, self._inf):
            if s is not None:
                s.close(linger=0)
        self._ctl = self._inf = None
        if self.http is not None:
            self.http.close()
        if self.daemon is not None:
            self.daemon.stop()

    def revive(self) -> None:
        """A daemon an earlier test killed is started afresh, so that one crash fails one
        test, not every test after it."""
        assert self.daemon is not None and self.daemon.proc is not None
        if self.daemon.proc.poll() is not None:
            self.stop()
            self.start()

    def control(self) -> ControlClient:
        assert self.daemon is not None
        return ControlClient(self.daemon.cfg.control_endpoint, timeout_s=60)

    def children(self) -> dict[str, int]:
        with self.control() as c:
            return {ch.name: ch.restarts for ch in c.status().children}

    # -- serving on -----------------------------------------------------------------------------

    def alive(self, what: str) -> None:
        assert self.daemon is not None and self.daemon.proc is not None
        rc = self.daemon.proc.poll()
        assert rc is None, (f"the daemon exited ({rc}) after {what}; sent since the last check:"
                            f"\n{self._recent()}\n{self.daemon.log_tail(60)}")

    def noted(self, what: str) -> None:
        """After every example: the daemon's pid still runs; every few, the full check."""
        self.sent.append(what)
        self.alive(what)
        if len(self.sent) >= FULL_CHECK_EVERY:
            self.check_serving(what)

    def check_serving(self, what: str) -> None:
        """The daemon serves on: a generation, ``/health``, no child restarted."""
        self.alive(what)
        assert self.daemon is not None and self.http is not None
        try:
            with self.daemon.client(timeout_s=60) as c:
                out = c.complete([1, 2, 3], max_tokens=2, temperature=0.0, ignore_eos=True)
            assert len(out.token_ids) == 2
            health = self.http.get("/health")
            assert health.status_code == 200, health.text
            assert self.children() == self.restarts, "a child restarted"
        except Exception as e:
            raise AssertionError(f"the daemon does not serve after {what} ({e!r}); sent since "
                                 f"the last check:\n{self._recent()}\n"
                                 f"{self.daemon.log_tail(60)}") from e
        self.sent.clear()

    def _recent(self) -> str:
        return "\n".join(f"  {s}" for s in self.sent[-FULL_CHECK_EVERY:])

    # -- ZeroMQ ---------------------------------------------------------------------------------

    def _socket(self, endpoint: str) -> zmq.Socket[bytes]:
        s: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        return s

    def ask_control(self, payload: bytes, what: str, timeout_s: float = 60) -> Any:
        """The reply to one control frame; a control socket has no request ids, so one
        that gets no reply is closed and made again."""
        assert self.daemon is not None
        if self._ctl is None:
            self._ctl = self._socket(self.daemon.cfg.control_endpoint)
        self._ctl.send(payload)
        if not self._ctl.poll(int(timeout_s * 1000)):
            self._ctl.close(linger=0)
            self._ctl = None
            self.alive(what)
            raise AssertionError(f"no reply within {timeout_s:.0f} s to {what}")
        return msgspec.msgpack.decode(self._ctl.recv(), type=ControlReply | Error)

    def inference_replies(self, payload: bytes, what: str) -> Iterator[Any]:
        """Every reply to one inference frame, through its last chunk or its error."""
        assert self.daemon is not None
        if self._inf is None:
            self._inf = self._socket(self.daemon.endpoint)
        self._inf.send(payload)
        while True:
            if not self._inf.poll(60_000):
                self._inf.close(linger=0)
                self._inf = None
                self.alive(what)
                raise AssertionError(f"no reply within 60 s to {what}")
            msg = msgspec.msgpack.decode(self._inf.recv(), type=ServerMessage)
            yield msg
            if not isinstance(msg, Chunk) or msg.finish_reason is not None:
                return

    def ctl(self, msg: Any) -> Any:
        return self.ask_control(pack(msg), short(msg))

    # -- HTTP -----------------------------------------------------------------------------------

    def request(self, method: str, url: str, what: str, **kw: Any) -> httpx.Response:
        assert self.http is not None
        try:
            return self.http.request(method, url, **kw)
        except httpx.HTTPError as e:
            self.alive(what)
            raise AssertionError(f"{what}: no answer, the connection failed ({e!r})") from e


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Harness]:
    from harli.bench.lora import make_adapter

    root = tmp_path_factory.mktemp("hostile")
    h = Harness(root, tiny_model, make_adapter(tiny_model, root / "adapter", seed=3))
    h.start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def h(harness: Harness) -> Iterator[Harness]:
    harness.revive()
    yield harness
    harness.check_serving("the test's last example")


# -- control ------------------------------------------------------------------------------------

# The reply a request gets when it is served.
REPLY: dict[type[Any], Any] = {
    ctl.AttachJob: ctl.JobInfo, ctl.ListJobs: ctl.JobList, ctl.ShowJob: ctl.JobDetail,
    ctl.CancelJob: ctl.JobInfo, ctl.PauseJob: ctl.JobInfo, ctl.ResumeJob: ctl.JobInfo,
    ctl.JobLogs: ctl.JobDetail, ctl.JobCheckpoints: ctl.CheckpointList,
    ctl.GetStatus: ctl.DaemonStatus, ctl.SetLevel: ctl.DaemonStatus,
    ctl.SetPolicy: ctl.DaemonStatus, ctl.AddAdapter: ctl.ModelInfo,
    ctl.RemoveAdapter: ctl.ModelInfo, ctl.ListModels: ctl.ModelList, ctl.AddFile: ctl.FileInfo,
    ctl.ListFiles: ctl.FileList, ctl.ShowFile: ctl.FileInfo, ctl.DeleteFile: ctl.FileInfo,
    ctl.GetMetrics: ctl.MetricsPage}
TYPE_BY_NAME = {c.__name__: c for c in (*CONTROL_TYPES, *INFERENCE_TYPES)}


def control_base(h: Harness, cls: type[Any]) -> dict[str, Any]:
    """A valid message of ``cls`` to put hostile values in."""
    token = secrets.token_hex(6)
    assert h.daemon is not None
    by_type: dict[str, dict[str, Any]] = {
        "AttachJob": {"spec": {"name": f"hostile-{token}", "dataset": str(h.dataset),
                               "output_dir": str(h.root / "out" / token), **SMALL_JOB}},
        "ListJobs": {}, "ListFiles": {}, "ShowFile": {"file_id": h.file_id},
        "DeleteFile": {"file_id": "file-0nosuchfile"}, "SetLevel": {"level": 2},
        "SetPolicy": {"policy": "static:2"},
        "AddAdapter": {"name": f"hostile-{token}", "path": str(h.adapter)},
        "RemoveAdapter": {"name": "no-such-adapter"},
        "JobLogs": {"job_id": h.job_id, "limit": 10},
    }
    fields = by_type.get(cls.__name__, {})
    if cls.__name__ == "AddFile":  # a fresh upload in place, for AddFile to register
        file_id = f"file-{token}"
        h.upload = h.daemon.cfg.files_dir / f"{file_id}.jsonl"
        h.upload.write_bytes(DATASET)
        fields = {"file_id": file_id, "filename": "d.jsonl", "purpose": "fine-tune",
                  "records": len(LINES), "format": "alpaca"}
    if "job_id" in {f.name for f in msgspec.structs.fields(cls)} \
            and "job_id" not in fields:
        fields["job_id"] = h.job_id
    return {"type": _tag(cls), **fields}


def send_control(h: Harness, cls: type[Any], msg: dict[str, Any],
                 changed: list[tuple[Field, Any]]) -> None:
    """``msg`` gets a refusal with a code that names one, or the reply its type gets; what it
    changed is undone (a job cancelled, an adapter or a file removed, the policy restored)."""
    what = f"{cls.__name__} with " + ", ".join(
        f"{'.'.join(map(str, f.path)) or '<keys>'}={short(v)}" for f, v in changed)
    reply = h.ask_control(pack(msg), what)
    out_of_range = [why for f, v in changed if (why := outside(f, v, h))]
    if isinstance(reply, Error):
        if cls is ctl.AddFile:  # not registered: as the HTTP front does, remove it
            h.upload.unlink(missing_ok=True)
        assert reply.code in REFUSALS, f"{what}: {reply.code}: {reply.message}"
        assert reply.message, what
        h.noted(what)
        return
    expected = REPLY.get(cls, tuple(typing.get_args(ControlReply)))
    assert isinstance(reply, expected), f"{what}: got {type(reply).__name__}"
    try:
        if isinstance(reply, ctl.JobInfo) and cls is ctl.AttachJob:
            job = follow_job(h, reply, what)
            assert not out_of_range or job.status == "failed", (
                f"{what} was accepted ({job.status}): {out_of_range}")
            return
        assert not out_of_range, f"{what} was accepted: {out_of_range}"
        if isinstance(reply, ctl.ModelInfo) and cls is ctl.AddAdapter:
            assert reply.name == msg["name"]
        if isinstance(reply, ctl.FileInfo) and cls is ctl.AddFile:
            assert reply.file_id == msg["file_id"]
        if isinstance(reply, ctl.DaemonStatus) and cls in (ctl.SetPolicy, ctl.SetLevel):
            assert reply.scheduler is not None
            slo = reply.scheduler.tpot_slo_ms
            assert math.isfinite(slo) and slo > 0, f"{what}: SLO {slo}"
    finally:
        undo(h, cls, msg, reply)
        h.noted(what)


def follow_job(h: Harness, job: ctl.JobInfo, what: str) -> ctl.JobInfo:
    """A job the daemon accepted, once the check of its files has ended: queued (running)
    or failed, saying why."""
    assert job.status in JOB_STATES, f"{what}: status {job.status!r}"
    deadline = time.monotonic() + 30
    while job.status == "validating_files":
        assert time.monotonic() < deadline, f"{what}: still validating_files after 30 s"
        time.sleep(0.05)
        reply = h.ctl({"type": "show_job", "job_id": job.job_id})
        assert isinstance(reply, ctl.JobDetail), f"{what}: show_job: {reply}"
        job = reply.job
    assert job.status in JOB_STATES, f"{what}: status {job.status!r}"
    assert job.status != "failed" or job.error, f"{what}: failed without saying why"
    return job


def undo(h: Harness, cls: type[Any], msg: dict[str, Any], reply: Any) -> None:
    if isinstance(reply, ctl.JobInfo) and cls is ctl.AttachJob:
        h.ctl({"type": "cancel_job", "job_id": reply.job_id})
    elif isinstance(reply, ctl.ModelInfo) and cls is ctl.AddAdapter:
        h.ctl({"type": "remove_adapter", "name": reply.name, "force": True})
    elif isinstance(reply, ctl.FileInfo) and cls is ctl.AddFile:
        h.ctl({"type": "delete_file", "file_id": reply.file_id})
    elif isinstance(reply, ctl.DaemonStatus) and cls in (ctl.SetPolicy, ctl.SetLevel):
        h.ctl({"type": "set_policy", "policy": h.policy[0], "tpot_slo_ms": h.policy[1]})


def with_changes(base: dict[str, Any], changed: list[tuple[Field, Any]]) -> dict[str, Any]:
    msg = base
    for f, v in changed:
        if "extra" in f.kinds:
            msg = {**msg, **v}
        else:
            if f.path[0] == "prompt_token_ids":  # exactly one of prompt, prompt_token_ids
                msg = {k: x for k, x in msg.items() if k != "prompt"}
            msg = set_in(msg, f.path, v)
    return msg


@pytest.mark.parametrize("f", CONTROL_FIELDS, ids=str)
def test_control_field_edges(h: Harness, f: Field) -> None:
    cls = TYPE_BY_NAME[f.owner]

    @EDGES
    @given(value=st.sampled_from(edges(f, h.root, "msgpack")))
    def one(value: Edge) -> None:
        send_control(h, cls, with_changes(control_base(h, cls), [(f, value.value)]),
                     [(f, value.value)])

    one()


# -- inference ----------------------------------------------------------------------------------


def inference_base(cls: type[Any]) -> dict[str, Any]:
    by_type: dict[str, dict[str, Any]] = {
        "Hello": {"protocol_version": 1},
        "Generate": {"request_id": f"hostile-{secrets.token_hex(6)}", "prompt": "The river",
                     "max_tokens": 2},
        "Abort": {"request_id": "no-such-request"}}
    return {"type": _tag(cls), **by_type.get(cls.__name__, {})}


def send_inference(h: Harness, cls: type[Any], msg: dict[str, Any],
                   changed: list[tuple[Field, Any]]) -> None:
    what = f"{cls.__name__} with " + ", ".join(
        f"{'.'.join(map(str, f.path)) or '<keys>'}={short(v)}" for f, v in changed)
    replies = list(h.inference_replies(pack(msg), what))
    last = replies[-1]
    if isinstance(last, Error):
        assert last.code in REFUSALS, f"{what}: {last.code}: {last.message}"
        assert last.message, what
    elif cls.__name__ == "Hello":
        assert last.protocol_version == msg["protocol_version"] == 1, what
    else:
        assert cls.__name__ == "Generate", f"{what}: {last}"
        assert last.finish_reason in ("length", "stop"), f"{what}: {last}"
    h.noted(what)


@pytest.mark.parametrize("f", INFERENCE_FIELDS, ids=str)
def test_inference_field_edges(h: Harness, f: Field) -> None:
    cls = TYPE_BY_NAME[f.owner]

    @EDGES
    @given(value=st.sampled_from(edges(f, h.root, "msgpack")))
    def one(value: Edge) -> None:
        send_inference(h, cls, with_changes(inference_base(cls), [(f, value.value)]),
                       [(f, value.value)])

    one()


def random_values(flavor: str) -> st.SearchStrategy[Any]:
    """Random values of any type, text that is no text included."""
    text = (st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
            if flavor == "msgpack" else st.text(max_size=40))
    ints = st.integers(-(2**63), 2**64 - 1) if flavor == "msgpack" else st.integers()
    scalar = st.one_of(text, ints, st.floats(), st.booleans(), st.none(),
                       st.binary(max_size=20).map(RawStr) if flavor == "msgpack"
                       else st.sampled_from(LONE))
    return st.one_of(scalar, st.lists(scalar, max_size=3),
                     st.dictionaries(text, scalar, max_size=2))


def random_changes(fields: list[Field], flavor: str) -> st.SearchStrategy[list[tuple[Field,
                                                                                    Any]]]:
    real = [f for f in fields if not f.kinds & {"extra", "body"}]
    return st.lists(st.tuples(st.sampled_from(real), random_values(flavor)), min_size=1,
                    max_size=3, unique_by=lambda fv: fv[0].path)


@pytest.mark.parametrize("cls", [c for c in (*CONTROL_TYPES, *INFERENCE_TYPES)
                                 if msgspec.structs.fields(c)], ids=lambda c: c.__name__)
def test_zmq_random_fields(h: Harness, cls: type[Any]) -> None:
    fields = [f for f in (*CONTROL_FIELDS, *INFERENCE_FIELDS) if f.owner == cls.__name__
              and "extra" not in f.kinds]

    @random_settings(6)
    @given(changes=random_changes(fields, "msgpack"))
    def one(changes: list[tuple[Field, Any]]) -> None:
        if cls in CONTROL_TYPES:
            send_control(h, cls, with_changes(control_base(h, cls), changes), changes)
        else:
            send_inference(h, cls, with_changes(inference_base(cls), changes), changes)

    one()


# -- HTTP ---------------------------------------------------------------------------------------


def http_base(h: Harness, route: str) -> dict[str, Any]:
    by_route: dict[str, dict[str, Any]] = {
        "completions": {"model": h.model, "prompt": "The river", "max_tokens": 2},
        "chat": {"model": h.model, "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "2 + 2 ="}]}]},
        "fine_tuning_jobs": {"model": h.model, "training_file": h.file_id,
                             "method": {"type": "supervised"},
                             "harli": {"max_steps": 1, "max_seq_len": 64}},
        "load_lora_adapter": {"lora_name": f"hostile-{secrets.token_hex(6)}",
                              "lora_path": str(h.adapter)},
        "unload_lora_adapter": {"lora_name": "no-such-adapter"},
    }
    return by_route[route]


def openai_error(r: httpx.Response, what: str) -> dict[str, Any]:
    """A 4xx with OpenAI's error object: the answer to every refused request. On vLLM's
    routes a refusal before any route runs (no such path, a body that is not even text) is
    FastAPI's ``{"detail"}``, as ``vllm serve`` answers it."""
    assert 400 <= r.status_code < 500, f"{what}: {r.status_code} {r.text[:500]}"
    harli_route = r.request.url.path.startswith(("/v1/files", "/v1/fine_tuning"))
    try:
        body = r.json()
        if not harli_route and isinstance(body, dict) and isinstance(body.get("detail"), str):
            return {"message": body["detail"], "type": None, "param": None,
                    "code": r.status_code}
        err = body["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{what}: {r.status_code} without an error object: "
                             f"{r.text[:300]!r}") from None
    assert set(err) >= {"message", "type", "param", "code"}, f"{what}: {err}"
    assert isinstance(err["message"], str) and err["message"], f"{what}: {err}"
    return dict(err)


def sse_events(text: str, what: str) -> list[dict[str, Any]]:
    lines = [x[len("data: "):] for x in text.split("\n\n") if x.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", f"{what}: the stream does not end in [DONE]"
    events = [json.loads(x) for x in lines[:-1]]
    for e in events:
        if "error" in e:
            assert e["error"]["type"] != "InternalServerError", f"{what}: {e}"
    return events


def check_http(h: Harness, route: str, body: Any, r: httpx.Response, what: str,
               changed: list[tuple[Field, Any]]) -> None:
    out_of_range = [why for f, v in changed if (why := outside(f, v, h))]
    if r.status_code >= 300:
        openai_error(r, what)
        return
    assert not out_of_range or route == "fine_tuning_jobs", f"{what} was accepted: {out_of_range}"
    if route in ("completions", "chat"):
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            sse_events(r.text, what)
        else:
            obj = r.json()
            assert obj["object"] == ("text_completion" if route == "completions"
                                     else "chat.completion"), what
            assert all(c["finish_reason"] in ("length", "stop") for c in obj["choices"]), what
    elif route == "fine_tuning_jobs":
        job = r.json()
        assert job["object"] == "fine_tuning.job", what
        try:
            status = follow_http_job(h, job, what)
            assert not out_of_range or status == "failed", (
                f"{what} was accepted ({status}): {out_of_range}")
        finally:
            h.request("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel", what)
    elif route == "load_lora_adapter":
        assert r.text.startswith("Success"), f"{what}: {r.text[:200]}"
        gone = h.request("POST", "/v1/unload_lora_adapter", what,
                         json={"lora_name": body["lora_name"]})
        assert gone.status_code == 200, f"{what}: unload: {gone.text[:200]}"
    else:
        assert r.text.startswith("Success"), f"{what}: {r.text[:200]}"


def follow_http_job(h: Harness, job: dict[str, Any], what: str) -> str:
    status = str(job["status"])
    deadline = time.monotonic() + 30
    while status == "validating_files":
        assert time.monotonic() < deadline, f"{what}: still validating_files after 30 s"
        time.sleep(0.05)
        r = h.request("GET", f"/v1/fine_tuning/jobs/{job['id']}", what)
        assert r.status_code == 200, f"{what}: {r.text[:300]}"
        status = r.json()["status"]
    assert status in JOB_STATES, f"{what}: status {status!r}"
    return status


def send_json(h: Harness, route: str, body: Any, changed: list[tuple[Field, Any]]) -> None:
    rt = ROUTE_OF[route]
    what = f"{rt.method} {rt.path} with " + ", ".join(
        f"{'.'.join(map(str, f.path)) or '<body>'}={short(v)}" for f, v in changed)
    raw = bytes(body) if isinstance(body, bytes) else to_json(body)
    r = h.request(rt.method, rt.path, what, content=raw,
                  headers={"Content-Type": "application/json"})
    check_http(h, route, body, r, what, changed)
    h.noted(what)


def json_body(h: Harness, route: str, changed: list[tuple[Field, Any]]) -> Any:
    body: Any = http_base(h, route)
    for f, v in changed:
        if "body" in f.kinds:
            return v
        body = set_in(body, f.path, v)
    return body


@pytest.mark.parametrize("f", HTTP_FIELDS, ids=str)
def test_http_field_edges(h: Harness, f: Field) -> None:
    values = body_edges() if "body" in f.kinds else edges(f, h.root, "json")

    @EDGES
    @given(value=st.sampled_from(values))
    def one(value: Edge) -> None:
        send_json(h, f.owner, json_body(h, f.owner, [(f, value.value)]), [(f, value.value)])

    one()


@pytest.mark.parametrize("route", [r.name for r in JSON_ROUTES])
def test_http_random_fields(h: Harness, route: str) -> None:
    @random_settings(8)
    @given(changes=random_changes(ROUTE_OF[route].fields, "json"))
    def one(changes: list[tuple[Field, Any]]) -> None:
        send_json(h, route, json_body(h, route, changes), changes)

    one()


@pytest.mark.parametrize(("method", "template"), ID_ROUTES, ids=lambda x: str(x))
def test_http_ids_that_name_nothing_are_404(h: Harness, method: str, template: str) -> None:
    """An id that is not one the API wrote names nothing: 404 (or 400), never another job."""

    @EDGES
    @given(value=st.sampled_from(id_edges()))
    def one(value: Edge) -> None:
        what = f"{method} {template.format(value.name)}"
        r = h.request(method, template.format(value.value), what)
        err = openai_error(r, what)
        assert r.status_code in (400, 404, 431), f"{what}: {r.status_code} {err}"
        h.noted(what)

    one()


@pytest.mark.parametrize(("template", "param"),
                         [(t, p) for t, ps in QUERY_ROUTES for p in ps], ids=str)
def test_http_query_edges(h: Harness, template: str, param: str) -> None:
    @EDGES
    @given(value=st.sampled_from(query_edges()))
    def one(value: Edge) -> None:
        url = template.format(job=f"ftjob-{h.job_id}") + f"?{param}={value.value}"
        what = f"GET {url[:200]}"
        r = h.request("GET", url, what)
        if r.status_code != 200:
            openai_error(r, what)
        else:
            assert r.json()["object"] == "list", what
        h.noted(what)

    one()


def multipart(parts: dict[str, bytes]) -> tuple[str, bytes]:
    """A multipart body written byte for byte (no client library escapes the hostile parts)."""
    boundary = secrets.token_hex(16).encode()
    body = b""
    body += (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
             + parts["purpose"] + b"\r\n")
    body += (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="'
             + parts["filename"] + b'"\r\nContent-Type: application/jsonl\r\n\r\n'
             + parts["file"] + b"\r\n")
    body += b"--" + boundary + b"--\r\n"
    return f"multipart/form-data; boundary={boundary.decode()}", body


@pytest.mark.parametrize("part", UPLOAD_PARTS)
def test_http_upload_edges(h: Harness, part: str) -> None:
    """An upload is refused with the part named, or kept; a job on a kept one gets its files
    checked (queued or failed), never a daemon that stops."""

    @EDGES
    @given(value=st.sampled_from(upload_edges(part)))
    def one(value: Edge) -> None:
        parts = {"purpose": b"fine-tune", "filename": b"d.jsonl", "file": DATASET,
                 part: value.value}
        ctype, body = multipart(parts)
        what = f"POST /v1/files with {part}={value.name}"
        r = h.request("POST", "/v1/files", what, content=body,
                      headers={"Content-Type": ctype})
        if r.status_code != 200:
            openai_error(r, what)
            h.noted(what)
            return
        file_id = r.json()["id"]
        assert part != "purpose" or value.value == b"fine-tune", f"{what} was accepted"
        try:
            job = h.request("POST", "/v1/fine_tuning/jobs", what, json={
                "model": h.model, "training_file": file_id, "harli": SMALL_JOB})
            if job.status_code != 200:
                openai_error(job, what)
            else:
                try:
                    follow_http_job(h, job.json(), what)
                finally:
                    h.request("POST", f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel", what)
        finally:
            with contextlib.suppress(AssertionError):
                h.request("DELETE", f"/v1/files/{file_id}", what)
        h.noted(what)

    one()


def test_every_message_type_and_route_is_covered() -> None:
    """The enumeration found what the modules define (a new message type or field needs no
    edit here; a message type without fields still gets unknown keys)."""
    assert {f.owner for f in CONTROL_FIELDS} == {c.__name__ for c in CONTROL_TYPES}
    assert {f.owner for f in INFERENCE_FIELDS} == {c.__name__ for c in INFERENCE_TYPES}
    paths = {str(f) for f in HTTP_FIELDS}
    for must in ("AttachJob.spec.output_dir", "AttachJob.spec.lora.target_modules.0",
                 "Generate.prompt_token_ids.0", "AddAdapter.path"):
        assert must in {str(f) for f in CONTROL_FIELDS + INFERENCE_FIELDS}, must
    for must in ("fine_tuning_jobs.harli.output_dir", "fine_tuning_jobs.harli.lora.r",
                 "fine_tuning_jobs.hyperparameters.n_epochs", "chat.<message>",
                 "completions.stream_options.include_usage", "load_lora_adapter.lora_path"):
        assert must in paths, must
    assert set(REPLY) == set(CONTROL_TYPES), "a control request without its reply type here"
    # hypothesis sends each edge once only while they fit in max_examples
    most = max(len(edges(f, Path("/tmp"), flavor)) for flavor, fs in (
        ("msgpack", CONTROL_FIELDS + INFERENCE_FIELDS), ("json", HTTP_FIELDS)) for f in fs)
    assert most <= (EDGES.max_examples or 0), most

