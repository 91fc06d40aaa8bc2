"""docs/protocol.md against the wire structs, so the document cannot drift from the protocol.

Conventions of the document that these tests rely on:

- ```` ```json LABEL ```` blocks are messages in JSON notation; LABEL names the channel whose
  real decoder (``harli.ipc.codec``) must accept them (``LABELS``). The daemon's own messages
  (``server``, ``control-reply``) carry every key, so their examples must too.
- ```` ```python ```` blocks are complete clients: each is run against a fake daemon (a ROUTER
  that decodes what it receives with the real codec and answers with real structs).
- ``<!-- struct: module.Name -->`` precedes the table of that struct: one row per key, in field
  order, first cell the key in backticks; with a ``default`` column, ``required`` or the default
  as a JSON literal in backticks (anything else: the field has a default too complex to print).
- The inference error codes (the ``| code | when |`` table after the ``Error`` struct's) and
  ``### Control errors``: each bad message below is fed to the real endpoint (``Frontend``,
  ``ControlEndpoint``), and the row of the code it answers must name the case.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import re
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
import zmq

from harli.config import load
from harli.daemon.control_endpoint import ControlEndpoint
from harli.daemon.frontend import Frontend
from harli.daemon.metrics import Metrics
from harli.ipc import control, inference, jobs
from harli.ipc.codec import ClientDecoder, Decoder, encode
from harli.ipc.control import ControlReply, ControlRequest, JobInfo, JobList, ListJobs, ShowJob
from harli.ipc.decode import IterationTelemetry
from harli.ipc.inference import Chunk, Error, ErrorCode, ServerMessage
from harli.ipc.jobs import JobSpec
from tests.unit.daemon.fake_sockets import FakeRouter

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()

LABELS: dict[str, Decoder[Any]] = {
    "client": ClientDecoder(),
    "server": Decoder(ServerMessage),
    "control-request": Decoder(ControlRequest),
    "control-reply": Decoder(ControlReply | Error),
    "job-spec": Decoder(JobSpec),
    "telemetry": Decoder(IterationTelemetry),
}
# Examples of the daemon's own messages, which always carry every key.
COMPLETE = {"server", "control-reply"}

_FENCE = re.compile(r"^```(\w+)(?:[ \t]+([\w-]+))?[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_MARKER = re.compile(r"<!-- struct: ([\w.]+) -->")


def _blocks(lang: str) -> list[tuple[str | None, str]]:
    return [(m.group(2), m.group(3)) for m in _FENCE.finditer(DOC) if m.group(1) == lang]


def _fields(cls: type[msgspec.Struct]) -> tuple[msgspec.structs.FieldInfo, ...]:
    return msgspec.structs.fields(cls)


def _tag(cls: type[msgspec.Struct]) -> tuple[str | None, Any]:
    cfg = cls.__struct_config__
    return cfg.tag_field, cfg.tag


# -- examples ----------------------------------------------------------------------------------


def test_the_document_has_examples_of_every_kind() -> None:
    labels = {label for label, _ in _blocks("json")}
    assert labels == set(LABELS)
    assert len(_blocks("python")) == 2


@pytest.mark.parametrize(("label", "text"), _blocks("json"))
def test_every_json_example_decodes_with_the_real_codec(label: str | None, text: str) -> None:
    assert label in LABELS, f"a ```json block needs a label, one of {sorted(LABELS)}: {text}"
    value = json.loads(text)
    msg = LABELS[label].decode(msgspec.msgpack.encode(value))
    if isinstance(msg, IterationTelemetry):  # array-like: the length is the whole check
        assert len(value) == 1 + len(_fields(IterationTelemetry))
    if label in COMPLETE:
        tag_field, _ = _tag(type(msg))
        keys = {f.encode_name for f in _fields(type(msg))} | {tag_field}
        assert set(value) == keys, f"{type(msg).__name__} example lacks {keys - set(value)}"


# -- the Python clients, run against a fake daemon ---------------------------------------------


def _job_example() -> JobInfo:
    for label, text in _blocks("json"):
        if label == "control-reply" and json.loads(text).get("type") == "job":
            return msgspec.msgpack.decode(msgspec.msgpack.encode(json.loads(text)),
                                          type=JobInfo)
    raise AssertionError("no `job` example in the document")


def _serve_one(router: zmq.Socket[bytes], got: list[Any]) -> None:
    """Answer one request the way the daemon would; what it decoded goes into ``got``."""
    if not router.poll(5000):
        return
    client, payload = router.recv_multipart()
    if router.get(zmq.LAST_ENDPOINT).endswith(b"inference.sock"):
        req = ClientDecoder().decode(payload)
        got.append(req)
        rid = getattr(req, "request_id", "?")
        router.send_multipart([client, encode(Chunk(request_id=rid, token_ids=[9], text="Hi",
                                                    num_prompt_tokens=1)),
                               encode(Chunk(request_id=rid, token_ids=[], text="!",
                                            finish_reason="length", num_prompt_tokens=1))])
    else:
        msg = Decoder(ControlRequest).decode(payload)
        got.append(msg)
        router.send_multipart([client, encode(JobList(jobs=[_job_example()]))])


@pytest.mark.parametrize("code", [text for _, text in _blocks("python")])
def test_every_python_example_runs_against_a_fake_daemon(code: str, tmp_path: Path) -> None:
    (endpoint,) = re.findall(r'"(ipc://[^"]+)"', code)
    local = f"ipc://{tmp_path}/{endpoint.rsplit('/', 1)[1]}"
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(local)
    got: list[Any] = []
    ns: dict[str, Any] = {}
    errors: list[BaseException] = []

    def client() -> None:
        try:
            exec(compile(code.replace(endpoint, local), "protocol.md", "exec"), ns)
        except BaseException as e:  # reported by the test's thread
            errors.append(e)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        t = threading.Thread(target=client, daemon=True)
        t.start()
        _serve_one(router, got)
        t.join(5)
    try:
        assert not t.is_alive(), "the example did not finish"
        assert not errors, errors
        assert len(got) == 1
        if "inference" in endpoint:
            assert out.getvalue() == "Hi!"
        else:
            job = _job_example()
            assert out.getvalue() == f"{job.job_id} {job.name} {job.status}\n"
    finally:
        router.close(0)
        sock = ns.get("s")
        if sock is not None and not t.is_alive():  # a hung example's socket is its thread's
            sock.close(0)
            sock.context.term()


# -- tables ------------------------------------------------------------------------------------


def _structs(module: ModuleType) -> list[type[msgspec.Struct]]:
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, msgspec.Struct) and c.__module__ == module.__name__
            and not c.__name__.startswith("_")]


PUBLIC = [*_structs(inference), *_structs(control), *_structs(jobs), IterationTelemetry]


def _tables() -> dict[str, tuple[list[str], list[list[str]]]]:
    """``{dotted struct name: (header, rows)}`` of the table after each marker."""
    out = {}
    for m in _MARKER.finditer(DOC):
        lines = DOC[m.end():].splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("|"))
        table = []
        for line in lines[start:]:
            if not line.startswith("|"):
                break
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
        header, _, *rows = table
        out[m.group(1)] = (header, rows)
    return out


def _cls(dotted: str) -> type[msgspec.Struct]:
    module, name = dotted.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type) and issubclass(cls, msgspec.Struct)
    return cls


def test_every_public_struct_has_a_table() -> None:
    documented = {_cls(name) for name in _tables()}
    missing = [c.__name__ for c in PUBLIC if c not in documented]
    assert not missing, f"structs with no table in docs/protocol.md: {missing}"


@pytest.mark.parametrize("dotted", sorted(_tables()))
def test_a_structs_table_has_every_field_in_order_with_its_default(dotted: str) -> None:
    cls = _cls(dotted)
    header, rows = _tables()[dotted]
    keys = [row[0] for row in rows]
    assert all(re.fullmatch(r"`\w+`", k) for k in keys), keys
    keys = [k.strip("`") for k in keys]
    tag_field, tag = _tag(cls)
    fields = _fields(cls)
    want = [f.encode_name for f in fields]
    if tag_field is not None and isinstance(tag, str) and tag != cls.__name__:
        want = [tag_field, *want]
        assert rows[0][1] == f'`"{tag}"`', f"{dotted}: the tag row should say `\"{tag}\"`"
    assert keys == want, f"{dotted}: documented {keys}, struct has {want}"
    if "default" not in header:
        return
    col = header.index("default")
    for f, row in zip(fields, rows[len(rows) - len(fields):], strict=True):
        cell = row[col]
        if f.required:
            assert cell == "required", f"{dotted}.{f.name} is required, documented {cell!r}"
            continue
        assert cell != "required", f"{dotted}.{f.name} has a default, documented required"
        literal = re.fullmatch(r"`([^`]*)`", cell)
        if literal:
            default = f.default if f.default_factory is msgspec.NODEFAULT else \
                f.default_factory()
            if isinstance(default, msgspec.Raw):  # passed on as sent: decode its bytes
                default = msgspec.msgpack.decode(default)
            assert json.loads(literal.group(1)) == msgspec.to_builtins(default), \
                f"{dotted}.{f.name}: default {default!r}, documented {cell}"


def test_the_telemetry_field_count_in_the_text_is_right() -> None:
    assert f"these {len(_fields(IterationTelemetry))} fields" in DOC


def test_every_error_code_is_documented() -> None:
    codes = [v for k, v in vars(ErrorCode).items() if k.isupper()]
    missing = [c for c in codes if f"| `{c}` |" not in DOC]
    assert not missing, missing


# -- error codes: what each endpoint answers to a bad message is what the tables say -------------

_LIMIT = 1024
_CFG = load(None, ['model.path="/models/m"', f"endpoints.max_message_bytes={_LIMIT}"])
_enc = msgspec.msgpack.encode
_DEEP = b"\x91" * 1020 + b"\xc0"  # valid MessagePack, nested past the decoder's limit


def _code_table(heading: str) -> dict[str, str]:
    """``{code: its "when" cell}`` of the first ``| code | when |`` table after ``heading``."""
    lines = DOC[DOC.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| code | when |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        code, when = [c.strip() for c in line.strip().strip("|").split("|")][:2]
        rows[code.strip("`")] = when
    return rows


class _Observer:
    def on_arrival(self, prompt_tokens: int, now: float, lora: bool = False) -> None: ...

    def on_tokens(self, gaps_s: list[float]) -> None: ...

    def on_request_done(self, first_s: float, last_s: float, n_tokens: int) -> None: ...


def _inference_answer(*frames: bytes) -> Any:
    """The real ``Frontend``'s one reply to one client message of ``frames``."""
    sock = FakeRouter(ServerMessage)
    fe = Frontend(sock, _CFG, Metrics(), send_decode=lambda _: True,
                  decode_running=lambda: True, decode_incarnation=lambda: 1,
                  runtime=lambda: None, accepting=lambda: True, observer=_Observer(),
                  clock=lambda: 0.0)
    sock.feed(b"c", *frames)
    fe.drain()
    (reply,) = sock.replies(b"c")
    return reply


def _control_answer(*frames: bytes) -> Any:
    """The real ``ControlEndpoint``'s one reply; it serves ``list_jobs`` and nothing else."""
    return _control_reply(*frames)[1]


def _control_reply(*frames: bytes) -> tuple[list[bytes], Any]:
    """The envelope and the reply of the real ``ControlEndpoint`` to ``frames``."""
    sock = FakeRouter(ControlReply | Error, envelope_frames=True)
    endpoint = ControlEndpoint(sock, _LIMIT, {ListJobs: lambda _: JobList(jobs=[])})
    sock.feed(b"c", *frames)
    endpoint.drain()
    (reply,) = sock.replies(b"c")
    (envelope,) = sock.envelopes
    return envelope, reply


_GENERATE = {"type": "generate", "request_id": "1", "prompt_token_ids": [1]}
_NOT_MSGPACK = [b"\xc1", b"hello", b"", b"\x81\xa4type"]  # bad opcode, text, empty, truncated

# (frames, code, words of the table's row for that code that name the case)
INFERENCE_CASES: list[tuple[list[bytes], str, str]] = [
    *[([p], "malformed", "not MessagePack") for p in _NOT_MSGPACK],
    ([_enc(_GENERATE) + b"\x00"], "malformed", "bytes after a complete message"),
    *[([_enc(v)], "malformed", "not a map") for v in (5, [1, 2], "generate", None)],
    ([_DEEP], "malformed", "nested too deeply"),
    ([_enc(_GENERATE), b"more"], "malformed", "not one frame"),
    ([_enc({"request_id": "1"})], "unknown_type", "`type` missing"),
    ([_enc({"type": "reboot"})], "unknown_type", "not one of the above"),
    ([_enc({"type": 3})], "unknown_type", "not one of the above"),
    ([_enc({**_GENERATE, "max_tokens": "8"})], "invalid", "of the wrong type"),
    ([_enc({**_GENERATE, "max_tokenz": 8})], "invalid", "unknown"),
    ([_enc({"type": "generate", "prompt": "x"})], "invalid", "a field missing"),
    ([_enc({**_GENERATE, "max_tokens": 0})], "invalid", "out of range"),
    ([b"\x00" * (_LIMIT + 1)], "too_large", "over `max_message_bytes`"),
]
CONTROL_CASES: list[tuple[list[bytes], str, str]] = [
    *[([p], "malformed", "not MessagePack") for p in _NOT_MSGPACK],
    ([_enc({"type": "list_jobs"}) + b"\x00"], "malformed", "bytes after a complete message"),
    ([_DEEP], "malformed", "nested too deeply"),
    *[([_enc(v)], "invalid", "not a map") for v in (5, [1, 2], "list_jobs", None)],
    ([_enc({"job_id": 1})], "invalid", "`type` missing or unknown"),
    ([_enc({"type": "reboot"})], "invalid", "`type` missing or unknown"),
    ([_enc({"type": "show_job", "job_id": "1"})], "invalid", "of the wrong type"),
    ([_enc({"type": "show_job"})], "invalid", "a key missing"),
    ([_enc({"type": "list_jobs", "bogus": 1})], "invalid", "out of range or unknown"),
    ([_enc({"type": "show_job", "job_id": 0})], "invalid", "out of range"),
    ([b"\x00" * (_LIMIT + 1)], "too_large", "over `max_message_bytes`"),
    ([encode(ShowJob(job_id=1))], "unknown_type", "has no handler"),
]


@pytest.mark.parametrize(("frames", "code", "says"), INFERENCE_CASES)
def test_the_inference_error_table_says_what_the_frontend_answers(
        frames: list[bytes], code: str, says: str) -> None:
    reply = _inference_answer(*frames)
    assert isinstance(reply, Error) and reply.code == code, reply
    table = _code_table("<!-- struct: harli.ipc.inference.Error -->")
    assert says in table[code], f"the `{code}` row should say {says!r}: {table[code]!r}"


@pytest.mark.parametrize(("frames", "code", "says"), CONTROL_CASES)
def test_the_control_error_table_says_what_the_control_endpoint_answers(
        frames: list[bytes], code: str, says: str) -> None:
    reply = _control_answer(*frames)
    assert isinstance(reply, Error) and reply.code == code and reply.request_id is None, reply
    table = _code_table("### Control errors")
    assert says in table[code], f"the `{code}` row should say {says!r}: {table[code]!r}"


def test_a_control_requests_envelope_comes_back_on_its_reply_as_documented() -> None:
    words = " ".join(DOC.split())
    assert "its last frame is the request, and the frames before it are its **envelope**, " \
           "sent back in front of its reply as they came" in words
    assert _control_reply(b"id-7", encode(ListJobs())) == ([b"id-7"], JobList(jobs=[]))
    assert _control_reply(b"a", b"b", encode(ListJobs())) == ([b"a", b"b"], JobList(jobs=[]))
    assert _control_reply(encode(ListJobs())) == ([], JobList(jobs=[]))


def test_both_error_tables_have_a_row_for_every_code_a_bad_message_gets() -> None:
    assert {c for _, c, _ in INFERENCE_CASES} <= set(
        _code_table("<!-- struct: harli.ipc.inference.Error -->"))
    assert {c for _, c, _ in CONTROL_CASES} <= set(_code_table("### Control errors"))
