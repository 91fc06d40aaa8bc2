"""``DaemonEngineClient.generate`` over a scripted daemon stream (no daemon, no engine): deltas
the consumer has not taken are merged by vLLM's collector, as ``AsyncLLM`` merges them; a
consumer that goes away cancels the request in the daemon; the daemon's refusal is vLLM's
exception."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.serial_utils import MsgpackEncoder

from harli.client.inference import RequestError
from harli.http_proc.engine_client import DaemonEngineClient
from harli.ipc.inference import Chunk


class ScriptedDaemon:
    """The inference link: each request's chunks, one per loop turn; then an error or an
    end, or (``hang``) nothing more."""

    def __init__(self, texts: list[str], error: RequestError | None = None,
                 hang: bool = False) -> None:
        self.texts, self.error, self.hang = texts, error, hang
        self.cancelled: list[str] = []
        self.sent = asyncio.Event()

    async def generate(self, prompt_ids: list[int], *, request_id: str, sampling_params: Any,
                       model: str | None) -> AsyncIterator[Chunk]:
        for k, text in enumerate(self.texts):
            await asyncio.sleep(0)
            last = k == len(self.texts) - 1 and not self.hang and self.error is None
            yield Chunk(request_id=request_id, token_ids=[k], text=text, finished=last,
                        finish_reason="length" if last else None)
        self.sent.set()
        if self.error is not None:
            raise self.error
        if self.hang:
            await asyncio.Event().wait()

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)


class _Processed:
    def __init__(self) -> None:
        self.prompt_token_ids = [1, 2, 3]


class _InputProcessor:
    def process_inputs(self, *args: Any, **kwargs: Any) -> _Processed:
        return _Processed()


def client(daemon: ScriptedDaemon) -> DaemonEngineClient:
    c = DaemonEngineClient.__new__(DaemonEngineClient)  # no vLLM config: no tokenizer
    c.inference = daemon  # type: ignore[assignment]
    c.input_processor = _InputProcessor()  # type: ignore[assignment]
    c._encoder = MsgpackEncoder(size_threshold=1 << 62)
    c._ids = itertools.count(1)
    c._prefix = "http-test"
    c._dead = None
    return c


def params(kind: RequestOutputKind = RequestOutputKind.DELTA) -> SamplingParams:
    p = SamplingParams(max_tokens=8)
    p.output_kind = kind
    return p


def test_a_stream_that_falls_behind_gets_the_deltas_merged() -> None:
    daemon = ScriptedDaemon(["a", "b", "c", "d"])

    async def main() -> list[str]:
        got = []
        stream = client(daemon).generate({"prompt_token_ids": [1]}, params(), "r1")
        async for out in stream:
            got.append(out.outputs[0].text)
            await daemon.sent.wait()  # busy elsewhere while the rest arrives
        return got

    got = asyncio.run(main())
    assert "".join(got) == "abcd" and len(got) < 4, got


def test_a_final_only_request_gets_one_gathered_output() -> None:
    async def main() -> list[Any]:
        stream = client(ScriptedDaemon(["a", "b"])).generate(
            {"prompt_token_ids": [1]}, params(RequestOutputKind.FINAL_ONLY), "r1")
        return [out async for out in stream]

    (out,) = asyncio.run(main())
    assert out.finished and out.outputs[0].text == "ab" and out.outputs[0].token_ids == [0, 1]


def test_a_consumer_that_goes_away_cancels_the_request_in_the_daemon() -> None:
    daemon = ScriptedDaemon(["a"], hang=True)

    async def main() -> None:
        stream = client(daemon).generate({"prompt_token_ids": [1]}, params(), "r1")
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(10):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert daemon.cancelled == ["http-test-1"]


def test_the_daemons_refusal_is_vllms_exception() -> None:
    daemon = ScriptedDaemon(["a"], error=RequestError("invalid", "too long"))

    got: list[str] = []

    async def main() -> None:
        async for out in client(daemon).generate({"prompt_token_ids": [1]}, params(), "r1"):
            got.append(out.outputs[0].text)

    with pytest.raises(VLLMValidationError, match="too long"):
        asyncio.run(main())
    # An output not taken yet when the error came is dropped for it, as vLLM's collector does.
    assert got in (["a"], [])
    assert daemon.cancelled == []  # the daemon ended it itself
