"""The inference ``Frontend`` on a fake ROUTER: what each client message leads to (a request
handed to decode, a typed error, a welcome), and how decode's outputs come back as chunks, with
what the scheduler is told on the way. No ZMQ, no process."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from harli.config import load
from harli.daemon.frontend import Frontend
from harli.daemon.metrics import Metrics
from harli.daemon.supervisor import ChildExited
from harli.ipc.codec import encode
from harli.ipc.decode import (
    AbortRequests,
    AddRequest,
    RequestOutput,
    RequestRejected,
    RuntimeInfo,
    StepOutputs,
)
from harli.ipc.inference import (
    PROTOCOL_VERSION,
    Abort,
    Chunk,
    Error,
    ErrorCode,
    Generate,
    Hello,
    ServerMessage,
    Welcome,
)

from .fake_sockets import FakeRouter

CFG = load(None, ['model.path="/models/m"', "endpoints.max_message_bytes=1024"])
NOW = 5.0


class Observer:
    """Records what the frontend tells the scheduler."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[int, float]] = []
        self.gaps: list[list[float]] = []
        self.done: list[tuple[float, float, int]] = []

    def on_arrival(self, prompt_tokens: int, now: float, lora: bool = False) -> None:
        self.arrivals.append((prompt_tokens, now))

    def on_tokens(self, gaps_s: list[float]) -> None:
        self.gaps.append(gaps_s)

    def on_request_done(self, first_s: float, last_s: float, n_tokens: int) -> None:
        self.done.append((first_s, last_s, n_tokens))


class Harness:
    def __init__(self) -> None:
        self.sock = FakeRouter(ServerMessage)
        self.to_decode: list[Any] = []
        self.decode_connected = True
        self.running = True
        self.incarnation = 1
        self.accepting = True
        self.runtime: RuntimeInfo | None = None
        self.observer = Observer()
        self.metrics = Metrics()
        self.fe = Frontend(self.sock, CFG, self.metrics, send_decode=self._send_decode,
                           decode_running=lambda: self.running,
                           decode_incarnation=lambda: self.incarnation,
                           runtime=lambda: self.runtime, accepting=lambda: self.accepting,
                           observer=self.observer, clock=lambda: NOW)

    def _send_decode(self, msg: Any) -> bool:
        if self.decode_connected:
            self.to_decode.append(msg)
        return self.decode_connected

    def send(self, client: bytes, msg: msgspec.Struct | bytes) -> list[Any]:
        """One message from ``client``, drained; the replies it got."""
        before = len(self.sock.replies(client))
        self.sock.feed(client, msg if isinstance(msg, bytes) else encode(msg))
        self.fe.drain()
        return self.sock.replies(client)[before:]

    def generate(self, client: bytes, request_id: str, **kw: Any) -> AddRequest | None:
        kw.setdefault("prompt_token_ids", [1, 2, 3])
        n = len(self.to_decode)
        assert self.send(client, Generate(request_id=request_id, **kw)) == []
        return self.to_decode[n] if len(self.to_decode) > n else None


def error_of(replies: list[Any]) -> Error:
    (reply,) = replies
    assert isinstance(reply, Error)
    return reply


def out(rid: str, tokens: list[int], finish: str | None = None) -> RequestOutput:
    return RequestOutput.single(rid=rid, token_ids=tokens, text="t" * len(tokens),
                                finish_reason=finish, stop_reason=None, num_prompt_tokens=3)


# -- client messages ---------------------------------------------------------------------------


def test_a_generate_goes_to_decode_and_counts_as_an_arrival() -> None:
    h = Harness()
    add = h.generate(b"c1", "a", max_tokens=4)
    assert isinstance(add, AddRequest) and add.request.request_id == "a"
    assert add.request.max_tokens == 4 and add.arrival_s > 0
    req = h.fe.requests.get(add.rid)
    assert req is not None and req.client == b"c1" and req.incarnation == 1
    assert h.observer.arrivals == [(3, NOW)]  # its prompt's tokens, at the frontend's clock


def test_a_text_prompt_counts_its_characters_as_an_upper_bound_of_its_tokens() -> None:
    h = Harness()
    h.generate(b"c1", "a", prompt="hello", prompt_token_ids=None)
    assert h.observer.arrivals == [(5, NOW)]


def test_a_request_waits_for_decode_and_goes_when_it_is_ready() -> None:
    h = Harness()
    h.running = False
    assert h.generate(b"c1", "a") is None
    h.decode_connected = False  # ready, but not connected yet: it stays pending
    h.running = True
    h.fe.dispatch_pending()
    assert h.to_decode == [] and len(h.fe.requests.pending()) == 1
    h.decode_connected = True
    h.fe.dispatch_pending()
    (add,) = h.to_decode
    assert isinstance(add, AddRequest) and not h.fe.requests.pending()
    assert h.observer.arrivals == [(3, NOW)]  # told once, when it reached decode


def test_hello_is_welcomed_with_the_servers_facts() -> None:
    h = Harness()
    h.running = False
    (w,) = h.send(b"c1", Hello(protocol_version=PROTOCOL_VERSION))
    assert isinstance(w, Welcome) and not w.ready and w.model == "/models/m"
    assert w.max_message_bytes == 1024 and w.max_model_len == CFG.model.max_model_len
    h.running = True
    h.runtime = RuntimeInfo(model="served", max_model_len=77, kv_blocks_total=8, block_size=16,
                            vllm_version="x", device="cpu")
    (w,) = h.send(b"c1", Hello(protocol_version=PROTOCOL_VERSION))
    assert isinstance(w, Welcome) and w.ready and (w.model, w.max_model_len) == ("served", 77)


def test_hello_in_another_protocol_version_is_refused() -> None:
    e = error_of(Harness().send(b"c1", Hello(protocol_version=PROTOCOL_VERSION + 1)))
    assert e.code == ErrorCode.PROTOCOL_VERSION and str(PROTOCOL_VERSION) in e.message


@pytest.mark.parametrize(("payload", "code", "request_id", "says"), [
    (b"\xc1", ErrorCode.MALFORMED, None, "MessagePack"),
    (msgspec.msgpack.encode([1, 2]), ErrorCode.MALFORMED, None, "expected a map"),
    (msgspec.msgpack.encode({"type": "nope", "request_id": "x"}), ErrorCode.UNKNOWN_TYPE,
     "x", "unknown message type 'nope'"),
    (msgspec.msgpack.encode({"type": "generate", "request_id": "x", "max_tokens": 0}),
     ErrorCode.INVALID, "x", "max_tokens"),
    (encode(Generate(request_id="x", prompt="p", prompt_token_ids=[1])), ErrorCode.INVALID,
     "x", "exactly one"),
    (encode(Generate(request_id="x", prompt_token_ids=[])), ErrorCode.INVALID, "x", "empty"),
    (b"\x91" * 500 + b"\xc0", ErrorCode.MALFORMED, None, "expected a map"),
    # nested past the decoder's recursion limit, inside the harness's 1024-byte limit
    (b"\x91" * 1020 + b"\xc0", ErrorCode.MALFORMED, None, "nested too deeply"),
])
def test_a_bad_message_gets_a_typed_error_and_reaches_nothing(
        payload: bytes, code: str, request_id: str | None, says: str) -> None:
    h = Harness()
    e = error_of(h.send(b"c1", payload))
    assert (e.code, e.request_id) == (code, request_id) and says in e.message
    assert h.to_decode == [] and not len(h.fe.requests)


def test_a_message_over_the_limit_is_refused_before_decoding() -> None:
    h = Harness()
    e = error_of(h.send(b"c1", Generate(request_id="big", prompt="x" * 2000)))
    assert (e.code, e.request_id) == (ErrorCode.TOO_LARGE, "big")
    assert "limit of 1024 bytes" in e.message and h.to_decode == []


def test_more_than_one_frame_is_malformed() -> None:
    h = Harness()
    h.sock.feed(b"c1", encode(Hello(protocol_version=PROTOCOL_VERSION)), b"extra")
    h.fe.drain()
    e = error_of(h.sock.replies(b"c1"))
    assert e.code == ErrorCode.MALFORMED and "exactly one frame" in e.message


def test_a_request_id_in_flight_is_refused_for_its_client_only() -> None:
    h = Harness()
    h.generate(b"c1", "a")
    e = error_of(h.send(b"c1", Generate(request_id="a", prompt_token_ids=[1])))
    assert (e.code, e.request_id) == (ErrorCode.DUPLICATE_REQUEST, "a")
    assert h.generate(b"c2", "a") is not None  # another client's "a" is another request
    assert len(h.fe.requests) == 2


def test_new_requests_are_refused_while_the_daemon_drains() -> None:
    h = Harness()
    h.accepting = False
    e = error_of(h.send(b"c1", Generate(request_id="a", prompt_token_ids=[1])))
    assert e.code == ErrorCode.SHUTTING_DOWN and h.to_decode == []


def test_abort_of_a_request_decode_has_goes_to_decode() -> None:
    h = Harness()
    add = h.generate(b"c1", "a")
    assert add is not None
    assert h.send(b"c1", Abort(request_id="a")) == []  # decode replies with the last chunk
    assert h.to_decode[-1] == AbortRequests(rids=[add.rid])


def test_abort_of_a_pending_request_ends_it_at_once() -> None:
    h = Harness()
    h.running = False
    h.generate(b"c1", "a")
    (c,) = h.send(b"c1", Abort(request_id="a"))
    assert isinstance(c, Chunk) and (c.request_id, c.finish_reason) == ("a", "abort")
    assert not len(h.fe.requests) and h.to_decode == []


def test_abort_of_an_unknown_request_is_an_error() -> None:
    h = Harness()
    h.generate(b"c2", "a")
    e = error_of(h.send(b"c1", Abort(request_id="a")))  # c2's "a" is not c1's
    assert (e.code, e.request_id) == (ErrorCode.UNKNOWN_REQUEST, "a")


def test_an_internal_error_is_answered_and_the_next_message_served() -> None:
    h = Harness()

    def broken(msg: Any) -> bool:
        raise RuntimeError("boom")

    h.fe.send_decode = broken
    e = error_of(h.send(b"c1", Generate(request_id="a", prompt_token_ids=[1])))
    assert (e.code, e.request_id) == (ErrorCode.INTERNAL, "a")
    (w,) = h.send(b"c1", Hello(protocol_version=PROTOCOL_VERSION))
    assert isinstance(w, Welcome)


# -- decode's outputs --------------------------------------------------------------------------


def test_outputs_come_back_as_one_message_per_client_per_iteration() -> None:
    h = Harness()
    a, b = h.generate(b"c1", "a"), h.generate(b"c1", "b")
    c = h.generate(b"c2", "c")
    assert a is not None and b is not None and c is not None
    h.fe.on_step_outputs(StepOutputs(incarnation=1, iteration=1, end_wall_s=10.0, outputs=[
        out(a.rid, [7]), out(b.rid, [8]), out(c.rid, [9])]))
    (c1, frames), (c2, _) = h.sock.sent
    assert (c1, c2) == (b"c1", b"c2")
    assert [(f.request_id, f.token_ids, f.token_times_s) for f in frames] == \
        [("a", [7], [10.0]), ("b", [8], [10.0])]
    assert h.observer.gaps == []  # first tokens: no gap yet
    h.fe.on_step_outputs(StepOutputs(incarnation=1, iteration=2, end_wall_s=10.5, outputs=[
        out(a.rid, [1, 2], finish="length")]))
    last = h.sock.replies(b"c1")[-1]
    assert isinstance(last, Chunk) and last.finish_reason == "length" and last.token_ids == [1, 2]
    assert h.fe.requests.get(a.rid) is None and len(h.fe.requests) == 2
    assert h.observer.gaps == [[0.5, 0.0]]  # one gap per new token: the second came with it
    assert h.observer.done == [(10.0, 10.5, 3)]
    assert h.metrics.registry.get_sample_value("harli_requests_total",
                                               {"outcome": "length"}) == 1


def test_outputs_of_another_incarnation_are_dropped() -> None:
    h = Harness()
    a = h.generate(b"c1", "a")
    assert a is not None
    h.fe.on_step_outputs(StepOutputs(incarnation=2, iteration=1, end_wall_s=1.0,
                                     outputs=[out(a.rid, [1], finish="stop")]))
    assert h.sock.sent == [] and h.fe.requests.get(a.rid) is not None


def test_a_request_the_engine_rejects_fails_with_its_reason() -> None:
    h = Harness()
    a = h.generate(b"c1", "a")
    assert a is not None
    h.fe.on_step_outputs(StepOutputs(incarnation=1, iteration=1, end_wall_s=1.0, outputs=[],
                                     rejected=[RequestRejected(rid=a.rid, message="too long")]))
    e = error_of(h.sock.replies(b"c1"))
    assert (e.code, e.request_id, e.message) == (ErrorCode.REJECTED, "a", "too long")
    assert not len(h.fe.requests)


def test_a_client_that_has_gone_has_its_requests_aborted() -> None:
    h = Harness()
    a, b = h.generate(b"c1", "a"), h.generate(b"c1", "b")
    other = h.generate(b"c2", "c")
    assert a is not None and b is not None and other is not None
    h.sock.gone.add(b"c1")
    h.fe.on_step_outputs(StepOutputs(incarnation=1, iteration=1, end_wall_s=1.0,
                                     outputs=[out(a.rid, [1])]))
    assert h.to_decode[-1] == AbortRequests(rids=[a.rid, b.rid])
    assert [r.request_id for r in h.fe.requests] == ["c"]


def test_a_decode_exit_fails_the_requests_it_was_serving() -> None:
    h = Harness()
    a = h.generate(b"c1", "a")
    h.running = False
    h.generate(b"c1", "pending")
    assert a is not None
    h.fe.on_decode_exit(ChildExited("decode", 1, -9, True))
    e = error_of(h.sock.replies(b"c1"))
    assert (e.code, e.request_id) == (ErrorCode.DECODE_DIED, "a")
    assert "killed by SIGKILL" in e.message
    assert [r.request_id for r in h.fe.requests] == ["pending"]  # waits for the next decode


def test_finish_all_aborts_at_decode_and_ends_every_request() -> None:
    h = Harness()
    a = h.generate(b"c1", "a")
    h.running = False
    h.generate(b"c2", "pending")
    assert a is not None
    h.fe.finish_all("shutdown")
    assert h.to_decode[-1] == AbortRequests(rids=[a.rid])  # only what decode has
    for client, rid in ((b"c1", "a"), (b"c2", "pending")):
        (c,) = h.sock.replies(client)
        assert isinstance(c, Chunk) and (c.request_id, c.finish_reason) == (rid, "shutdown")
    assert not len(h.fe.requests)


# -- max_tokens beside the prompt: an error, never silently capped -----------------------------


def test_max_tokens_past_the_models_length_is_invalid_and_names_both_numbers() -> None:
    h = Harness()
    h.runtime = RuntimeInfo(model="served", max_model_len=100, kv_blocks_total=8,
                            block_size=16, vllm_version="x", device="cpu")
    e = error_of(h.send(b"c1", Generate(request_id="a", prompt_token_ids=[1] * 30,
                                        max_tokens=71)))
    assert (e.code, e.request_id) == (ErrorCode.INVALID, "a")
    assert "maximum context length is 100 tokens" in e.message
    assert "101 tokens (30 in the prompt, 71 in the completion)" in e.message
    assert "at most 70" in e.message
    assert h.to_decode == [] and not len(h.fe.requests)
    assert h.generate(b"c1", "b", prompt_token_ids=[1] * 30, max_tokens=70) is not None


def test_a_prompt_longer_than_the_model_is_left_to_the_engine() -> None:
    h = Harness()  # the engine's "rejected" names the prompt's length; it is not max_tokens'
    h.runtime = RuntimeInfo(model="served", max_model_len=10, kv_blocks_total=8,
                            block_size=16, vllm_version="x", device="cpu")
    assert h.generate(b"c1", "a", prompt_token_ids=[1] * 10) is not None
    assert h.generate(b"c1", "b", prompt_token_ids=[1] * 12) is not None


def test_a_text_prompts_max_tokens_is_checked_before_and_after_tokenization() -> None:
    h = Harness()  # CFG.model.max_model_len: 2048, no runtime yet
    e = error_of(h.send(b"c1", Generate(request_id="a", prompt="hi", max_tokens=2048)))
    assert e.code == ErrorCode.INVALID and "2048" in e.message and h.to_decode == []
    add = h.generate(b"c1", "b", prompt="hi", prompt_token_ids=None, max_tokens=2000)
    assert add is not None
    h.fe.on_step_outputs(StepOutputs(incarnation=1, iteration=1, end_wall_s=1.0, outputs=[
        RequestOutput.single(rid=add.rid, token_ids=[5], text="x", finish_reason=None,
                             stop_reason=None, num_prompt_tokens=60)]))
    e = error_of(h.sock.replies(b"c1")[1:])  # instead of the first chunk
    assert (e.code, e.request_id) == (ErrorCode.INVALID, "b")
    assert "2060 tokens (60 in the prompt, 2000 in the completion)" in e.message
    assert h.to_decode[-1] == AbortRequests(rids=[add.rid]) and not len(h.fe.requests)


def test_a_pending_request_is_checked_once_decode_says_the_models_length() -> None:
    h = Harness()
    h.fe.cfg = load(None, ['model.path="/models/m"', "model.max_model_len=0"])
    h.running = False
    assert h.generate(b"c1", "a", max_tokens=500) is None  # the length is not known yet
    h.running = True
    h.runtime = RuntimeInfo(model="served", max_model_len=100, kv_blocks_total=8,
                            block_size=16, vllm_version="x", device="cpu")
    h.fe.dispatch_pending()
    e = error_of(h.sock.replies(b"c1"))
    assert e.code == ErrorCode.INVALID and "503 tokens" in e.message and h.to_decode == []


# -- num_prompt_tokens on the last chunk --------------------------------------------------------


def test_the_last_chunk_after_an_abort_has_the_prompts_token_count() -> None:
    h = Harness()
    a = h.generate(b"c1", "a", prompt="hello", prompt_token_ids=None)
    b = h.generate(b"c1", "b", prompt_token_ids=[1, 2, 3, 4])
    assert a is not None and b is not None
    h.fe.on_step_outputs(StepOutputs(incarnation=1, iteration=1, end_wall_s=1.0, outputs=[
        RequestOutput.single(rid=a.rid, token_ids=[5], text="x", finish_reason=None,
                             stop_reason=None, num_prompt_tokens=2)]))
    # decode's own abort output does not know the prompt: it says 0
    h.fe.on_step_outputs(StepOutputs(incarnation=1, iteration=2, end_wall_s=2.0, outputs=[
        RequestOutput.single(rid=r, token_ids=[], text="", finish_reason="abort", stop_reason=None,
                             num_prompt_tokens=0) for r in (a.rid, b.rid)]))
    last = h.sock.replies(b"c1")[-2:]
    assert [(c.request_id, c.finish_reason, c.num_prompt_tokens) for c in last] == \
        [("a", "abort", 2), ("b", "abort", 4)]


def test_a_pending_request_ended_at_once_has_its_prompts_token_count() -> None:
    h = Harness()
    h.running = False
    h.generate(b"c1", "a", prompt_token_ids=[1, 2, 3, 4, 5])
    (c,) = h.send(b"c1", Abort(request_id="a"))
    assert isinstance(c, Chunk) and (c.finish_reason, c.num_prompt_tokens) == ("abort", 5)


# -- the request counts -------------------------------------------------------------------------


def test_a_failed_request_is_counted_by_its_error() -> None:
    h = Harness()
    a = h.generate(b"c1", "a")
    assert a is not None
    h.fe.on_step_outputs(StepOutputs(incarnation=1, iteration=1, end_wall_s=1.0, outputs=[],
                                     rejected=[RequestRejected(rid=a.rid, message="too long")]))
    assert h.metrics.registry.get_sample_value("harli_requests_total",
                                               {"outcome": ErrorCode.REJECTED}) == 1
