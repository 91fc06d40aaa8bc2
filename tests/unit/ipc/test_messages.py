"""Every wire struct survives encode -> decode; bad bytes map to typed error codes."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harli.ipc.codec import ClientDecoder, DecodeFailure, Decoder, encode, request_id_of
from harli.ipc.control import (
    ControlReply,
    ControlRequest,
    GetMetrics,
    JobDetail,
    JobInfo,
    JobLogs,
    MetricsPage,
    TrainMetric,
    ValidMetric,
)
from harli.ipc.decode import (
    AbortRequests,
    AddRequest,
    DaemonToDecode,
    DecodeToDaemon,
    Fatal,
    IterationTelemetry,
    Ready,
    RequestOutput,
    RequestRejected,
    RuntimeInfo,
    Shutdown,
    StepOutputs,
)
from harli.ipc.finetune import CheckpointSaved, FinetuneToDaemon, StepLogged, ValidationScore
from harli.ipc.inference import (
    Abort,
    Chunk,
    ClientMessage,
    Error,
    ErrorCode,
    Generate,
    Hello,
    ServerMessage,
    Welcome,
)
from harli.ipc.jobs import JobSpec

JOB = JobInfo(job_id=1, name="j", status="running", priority=0, created_s=1.0, started_s=2.0,
              finished_s=None, step=1, total_steps=4, epoch=0, micro_steps=1, tokens=64,
              loss=2.0, first_loss=2.0, level=1, paused_s=0.0, tokens_per_s=99.5,
              checkpoint_step=None, restarts=0, error=None, adapter_path=None,
              dataset_report=None, spec=JobSpec(name="j", dataset="/d.jsonl",
                                                validation_file="/v.jsonl"),
              valid_loss=2.5, valid_accuracy=0.5)
INFO = RuntimeInfo(model="m", max_model_len=2048, kv_blocks_total=10, block_size=128,
                   vllm_version="0.32.0", device="cpu")
GEN = Generate(request_id="a", prompt_token_ids=[1, 2], max_tokens=3, temperature=0.5,
               top_p=0.9, seed=4, stop=["x"], ignore_eos=True)

CASES: list[tuple[object, msgspec.Struct]] = [
    (ClientMessage, Hello(protocol_version=1, client="t")),
    (ClientMessage, GEN),
    (ClientMessage, Generate(request_id="b", prompt="hello")),
    (ClientMessage, Abort(request_id="a")),
    (ServerMessage, Welcome(protocol_version=1, ready=True, server_version="0", model="m",
                            max_model_len=5, max_message_bytes=9)),
    (ServerMessage, Chunk(request_id="a", token_ids=[1], text="x", token_times_s=[1.5],
                          finish_reason="stop", stop_reason="x", num_prompt_tokens=2)),
    (ServerMessage, Chunk(request_id="a", token_ids=[], stop_reason=7)),
    (ServerMessage, Error(request_id=None, code="malformed", message="m")),
    (DaemonToDecode, AddRequest(rid="r1", request=GEN, arrival_s=1.0)),
    (DaemonToDecode, AbortRequests(rids=["r1", "r2"])),
    (DaemonToDecode, Shutdown(reason="bye")),
    (DecodeToDaemon, Ready(incarnation=2, pid=3, info=INFO)),
    (DecodeToDaemon, StepOutputs(incarnation=1, iteration=4, end_wall_s=2.0, outputs=[
        RequestOutput.single(rid="r1", token_ids=[5], text="t", finish_reason=None,
                             stop_reason=None, num_prompt_tokens=2)],
        rejected=[RequestRejected(rid="r2", message="no")])),
    (DecodeToDaemon, Fatal(incarnation=1, error="e", traceback="tb")),
    (IterationTelemetry, IterationTelemetry(
        incarnation=1, iteration=2, start_s=1.0, end_s=1.5, num_running=3, num_waiting=0,
        decode_tokens=3, prefill_tokens=0, context_tokens=40, kv_blocks_total=10,
        kv_blocks_free=7)),
    (IterationTelemetry, IterationTelemetry(
        incarnation=1, iteration=3, start_s=1.5, end_s=1.6, num_running=2, num_waiting=1,
        decode_tokens=2, prefill_tokens=0, context_tokens=40, kv_blocks_total=10,
        kv_blocks_free=7, lora_requests=2, lora_adapters=1, running_lora_adapters=["a"],
        waiting_lora_adapters=["a", "b"])),
    (FinetuneToDaemon, StepLogged(job_id=1, step=4, epoch=0.5, loss=None, learning_rate=1e-3,
                                  grad_norm=0.25, tokens=640, tokens_per_s=1200.0, level=2)),
    (FinetuneToDaemon, CheckpointSaved(job_id=1, step=4, path="/o/checkpoint-4", epoch=0.5,
                                       validation=ValidationScore(
                                           loss=1.5, accuracy=0.25, examples=3, tokens=30,
                                           duration_s=0.1))),
    (FinetuneToDaemon, CheckpointSaved(job_id=1, step=4, path="/o/checkpoint-4",
                                       validation_error="given up")),
    (ControlRequest, JobLogs(job_id=1, after_event=3, after_metric=9, limit=50)),
    (ControlRequest, GetMetrics()),
    (ControlReply, MetricsPage(text="# TYPE x gauge\nx 1.0\n",
                               content_type="text/plain; version=0.0.4; charset=utf-8")),
    (ControlReply, JobDetail(job=JOB, events=[], truncated=True, metrics=[
        TrainMetric(metric_id=1, job_id=1, time_s=5.0, step=1, epoch=0.1, train_loss=2.0,
                    learning_rate=1e-3, grad_norm=None, tokens=64, tokens_per_s=99.5, level=1),
        ValidMetric(metric_id=2, job_id=1, time_s=6.0, step=1, epoch=0.1, valid_loss=2.5,
                    valid_accuracy=0.5, examples=4, tokens=20)])),
]


@pytest.mark.parametrize(("union", "msg"), CASES, ids=lambda c: type(c).__name__)
def test_round_trip(union: object, msg: msgspec.Struct) -> None:
    assert Decoder(union).decode(encode(msg)) == msg


def test_public_messages_are_maps_with_a_type_field() -> None:
    raw = msgspec.msgpack.decode(encode(GEN))
    assert raw["type"] == "generate" and raw["max_tokens"] == 3


@given(st.text(min_size=1, max_size=40), st.lists(st.integers(0, 2**31), max_size=50),
       st.integers(1, 10_000), st.floats(0, 5), st.floats(0.01, 1.0))
def test_generate_round_trips_for_any_valid_values(rid: str, ids: list[int], mt: int,
                                                   temp: float, top_p: float) -> None:
    msg = Generate(request_id=rid, prompt_token_ids=ids, max_tokens=mt, temperature=temp,
                   top_p=top_p)
    assert ClientDecoder().decode(encode(msg)) == msg


def _failure(data: bytes) -> DecodeFailure:
    with pytest.raises(DecodeFailure) as ei:
        ClientDecoder().decode(data)
    return ei.value


def test_not_msgpack_is_malformed() -> None:
    assert _failure(b"\xc1").code == ErrorCode.MALFORMED


def test_not_a_map_is_malformed() -> None:
    assert _failure(msgspec.msgpack.encode("text")).code == ErrorCode.MALFORMED


def test_unknown_type_is_named() -> None:
    f = _failure(msgspec.msgpack.encode({"type": "nope"}))
    assert f.code == ErrorCode.UNKNOWN_TYPE and "'nope'" in f.message


def test_missing_type_is_unknown_type() -> None:
    assert _failure(msgspec.msgpack.encode({"request_id": "x"})).code == ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize(("fields", "named"), [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "3"}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"prompt_token_ids": [-1]}, "prompt_token_ids"), ({"request_id": ""}, "request_id"),
    ({"extra": 1}, "extra"),
])
def test_invalid_fields_are_named(fields: dict[str, object], named: str) -> None:
    f = _failure(msgspec.msgpack.encode({"type": "generate", "request_id": "r", **fields}))
    assert f.code == ErrorCode.INVALID and named in f.message


def test_request_id_of_undecodable_messages() -> None:
    assert request_id_of(msgspec.msgpack.encode({"request_id": "q", "max_tokens": "x"})) == "q"
    assert request_id_of(b"\xc1") is None
    assert request_id_of(msgspec.msgpack.encode([1])) is None


@pytest.mark.parametrize("msg", [
    {"type": "attach", "spec": {"name": "digits\n", "dataset": "/d.jsonl"}},
    {"type": "add_adapter", "name": "digits\n", "path": "/a"},
    {"type": "remove_adapter", "name": "digits\n"},
    {"type": "show_file", "file_id": "file-abc\n"},
])
def test_names_and_ids_with_a_trailing_newline_are_invalid(msg: dict[str, object]) -> None:
    # Python's ``$`` matches before a trailing newline: such a name once became a job, a
    # directory and a served model's name with a newline in it.
    with pytest.raises(DecodeFailure) as e:
        Decoder(ControlRequest).decode(msgspec.msgpack.encode(msg))
    assert e.value.code == ErrorCode.INVALID and "matching regex" in e.value.message
