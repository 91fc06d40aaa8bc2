"""Hostile frames on both public sockets of the real daemon: nested, huge and wrong-typed
MessagePack, random bytes. Every frame gets an answer, and the daemon still serves."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harli.bench.local_daemon import LocalDaemon
from harli.ipc.control import ControlReply
from harli.ipc.inference import Error, ServerMessage

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

# Any MessagePack value: scalars at their edges, and containers nested up to the strategy's size.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True), st.text(max_size=50), st.binary(max_size=50))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=30)
INFERENCE_TYPES = ("hello", "generate", "abort", "nope")
CONTROL_TYPES = ("attach", "list_jobs", "show_job", "cancel_job", "job_logs", "status",
                 "set_level", "set_policy", "nope")
FIELDS = ("request_id", "prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p",
          "protocol_version", "job_id", "after_event", "level", "policy", "spec", "priority")


def typed_messages(types: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    """Maps with a known (or unknown) ``type`` and wrong-typed fields."""
    return st.builds(
        lambda t, fields: msgspec.msgpack.encode({"type": t, **fields}),
        st.sampled_from(types), st.dictionaries(st.sampled_from(FIELDS), values, max_size=4))


def nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"


def frames(types: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        typed_messages(types),
        values.map(msgspec.msgpack.encode),
        st.binary(max_size=200),
        st.integers(min_value=1, max_value=20_000).map(nested),
    )


def ask(sock: zmq.Socket[Any], payload: bytes, reply_type: Any) -> Any:
    sock.send(payload)
    assert sock.poll(30_000), f"no answer to {payload[:40]!r}"
    return msgspec.msgpack.decode(sock.recv(), type=reply_type)


@pytest.fixture(scope="module")
def sockets(daemon: LocalDaemon) -> Any:
    ctx = zmq.Context.instance()
    socks = []
    for endpoint in (daemon.endpoint, daemon.cfg.control_endpoint):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(payload=frames(INFERENCE_TYPES))
def test_every_inference_frame_gets_an_answer(sockets: Any, payload: bytes) -> None:
    inference = sockets[0]
    reply = ask(inference, payload, ServerMessage)
    if not isinstance(reply, Error):  # a valid request slipped through: let it finish
        while inference.poll(30_000):
            msg = msgspec.msgpack.decode(inference.recv(), type=ServerMessage)
            if isinstance(msg, Error) or getattr(msg, "finished", True):
                break


@FUZZ
@given(payload=frames(CONTROL_TYPES))
def test_every_control_frame_gets_an_answer(sockets: Any, payload: bytes) -> None:
    reply = ask(sockets[1], payload, ControlReply | Error)
    if isinstance(reply, Error):
        assert reply.code != "internal", reply


def test_the_daemon_still_serves_after_the_fuzz(daemon: LocalDaemon) -> None:
    with daemon.client(timeout_s=60) as c:
        out = c.complete([1, 2, 3], max_tokens=3, temperature=0.0, ignore_eos=True)
    assert len(out.token_ids) == 3
    from harli.client.control import ControlClient

    with ControlClient(daemon.cfg.control_endpoint, timeout_s=30) as ctl:
        assert ctl.status().state == "serving"
