"""Every kind of bad client input gets a typed error naming the problem, and the daemon keeps
serving everyone else (each case is checked against a healthy request afterwards)."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest
import zmq

from harli.bench.local_daemon import LocalDaemon
from harli.client.inference import InferenceClient, RequestError
from harli.ipc.inference import Error, Generate, Hello

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

enc = msgspec.msgpack.Encoder()


@pytest.fixture
def client(daemon: LocalDaemon) -> Iterator[InferenceClient]:
    with daemon.client(timeout_s=30) as c:
        yield c
    # After every bad input, another client is still served.
    with daemon.client(timeout_s=60) as other:
        out = other.complete([1, 2, 3], max_tokens=3, temperature=0.0, ignore_eos=True)
        assert len(out.token_ids) == 3


def _raw_error(client: InferenceClient, payload: bytes) -> Error:
    client.send_raw(payload)
    msg = client.recv_unattributed()
    assert isinstance(msg, Error), msg
    return msg


def test_malformed_msgpack(client: InferenceClient) -> None:
    err = _raw_error(client, b"\xc1\xff not msgpack")
    assert err.code == "malformed" and "MessagePack" in err.message


def test_msgpack_that_is_not_a_map(client: InferenceClient) -> None:
    err = _raw_error(client, enc.encode([1, 2, 3]))
    assert err.code == "malformed" and "map" in err.message


def test_unknown_message_type(client: InferenceClient) -> None:
    err = _raw_error(client, enc.encode({"type": "launch_missiles", "request_id": "x"}))
    assert err.code == "unknown_type" and "launch_missiles" in err.message


def test_wrong_field_type_names_the_field(client: InferenceClient) -> None:
    err = _raw_error(client, enc.encode({"type": "generate", "request_id": "w",
                                         "prompt": "hi", "max_tokens": "many"}))
    assert err.code == "invalid" and "max_tokens" in err.message
    assert err.request_id == "w"


def test_unknown_field_is_refused(client: InferenceClient) -> None:
    err = _raw_error(client, enc.encode({"type": "generate", "request_id": "u",
                                         "prompt": "hi", "max_tokenz": 3}))
    assert err.code == "invalid" and "max_tokenz" in err.message


@pytest.mark.parametrize(("field", "value"), [("max_tokens", 0), ("max_tokens", -5),
                                              ("temperature", -0.1), ("top_p", 0.0)])
def test_out_of_range_sampling_values(client: InferenceClient, field: str, value: float) -> None:
    err = _raw_error(client, enc.encode({"type": "generate", "request_id": "r",
                                         "prompt": "hi", field: value}))
    assert err.code == "invalid" and field in err.message


def test_client_helper_raises_on_invalid_values(client: InferenceClient) -> None:
    with pytest.raises(RequestError) as ei:
        client.complete("hi", max_tokens=0)
    assert ei.value.code == "invalid" and "max_tokens" in ei.value.message


def test_both_or_neither_prompt(client: InferenceClient) -> None:
    err = _raw_error(client, enc.encode(Generate(request_id="b", prompt="x",
                                                 prompt_token_ids=[1])))
    assert err.code == "invalid" and "prompt" in err.message
    err = _raw_error(client, enc.encode(Generate(request_id="n")))
    assert err.code == "invalid"


def test_prompt_longer_than_the_model(client: InferenceClient) -> None:
    with pytest.raises(RequestError) as ei:
        client.complete([7] * 3000, max_tokens=4)
    assert ei.value.code == "rejected"
    assert "3000" in ei.value.message and "2048" in ei.value.message


def test_text_prompt_longer_than_the_model(client: InferenceClient) -> None:
    with pytest.raises(RequestError) as ei:
        client.complete("the river ran " * 1200, max_tokens=4)
    assert ei.value.code == "rejected" and "2048" in ei.value.message


def test_message_over_the_size_limit(client: InferenceClient) -> None:
    big = Generate(request_id="big", prompt="x" * 100_000)  # limit is 64 KiB in this daemon
    err = _raw_error(client, enc.encode(big))
    assert err.code == "too_large" and "65536" in err.message and err.request_id == "big"


def test_message_over_the_hard_limit_drops_only_that_connection(daemon: LocalDaemon) -> None:
    ctx = zmq.Context.instance()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(daemon.endpoint)
    rogue.send(b"\x00" * (4 * 65536 + 1))  # libzmq (ZMQ_MAXMSGSIZE) disconnects this peer
    rogue.close()
    with daemon.client(timeout_s=60) as c:
        assert len(c.complete([4, 5], max_tokens=2, ignore_eos=True).token_ids) == 2


def test_abort_for_an_unknown_id(client: InferenceClient) -> None:
    with pytest.raises(RequestError) as ei:
        client.abort("never-sent")
    assert ei.value.code == "unknown_request" and "never-sent" in ei.value.message


def test_duplicate_request_id_in_flight(client: InferenceClient) -> None:
    stream = client.generate([1, 2], max_tokens=400, ignore_eos=True, request_id="dup")
    next(stream)
    client.send_raw(enc.encode(Generate(request_id="dup", prompt_token_ids=[3])))
    # The error arrives on the "dup" stream's inbox, between its chunks.
    with pytest.raises(RequestError) as ei:
        list(stream)  # would end with finish_reason "length" if the error never came
    assert ei.value.code == "duplicate_request"
    client.abort("dup")


def test_wrong_protocol_version(client: InferenceClient) -> None:
    err = _raw_error(client, enc.encode(Hello(protocol_version=999)))
    assert err.code == "protocol_version" and "999" in err.message


def test_multiframe_message(client: InferenceClient, daemon: LocalDaemon) -> None:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(daemon.endpoint)
    try:
        s.send_multipart([b"", enc.encode(Hello(protocol_version=1))])
        assert s.poll(10_000)
        err = msgspec.msgpack.decode(s.recv(), type=Error)
        assert err.code == "malformed" and "frame" in err.message
    finally:
        s.close()


@pytest.mark.parametrize("depth", [500, 2000, 60_000])
def test_deeply_nested_frames_are_malformed_and_the_daemon_lives(
        client: InferenceClient, daemon: LocalDaemon, depth: int) -> None:
    # Past the decoder's recursion limit this once escaped the frontend's error path and
    # ended the daemon with its children.
    err = _raw_error(client, b"\x91" * depth + b"\xc0")
    assert err.code == "malformed", err
    from harli.client.control import ControlClient

    with ControlClient(daemon.cfg.control_endpoint, timeout_s=30) as ctl:
        with pytest.raises(RequestError) as e:
            ctl.request(b"\x91" * depth + b"\xc0")
        assert e.value.code in ("malformed", "invalid")
        assert ctl.status().state == "serving"
