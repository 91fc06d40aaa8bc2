"""``DaemonEngineClient``: vLLM's ``EngineClient`` over the daemon, so that vLLM's own OpenAI
serving layer (its request models, renderer, serving classes and errors) answers the API while
every request is admitted and scheduled by the daemon and decoded by its vLLM engine.

vLLM's serving classes render a request (chat template, tokenization, ``SamplingParams``) and
call ``generate`` with the prompt's token ids; here that becomes one native ``Generate`` whose
``sampling_params`` is the ``SamplingParams`` whole, encoded by vLLM's own msgpack encoder. The
decode process hands it to its ``LLMEngine`` as given, and streams back each iteration's
completion deltas (text detokenized there, logprobs with vLLM's ranks), which become vLLM
``RequestOutput``s again: deltas for a stream, one gathered output otherwise. The front runs
vLLM's input processor on the request first, as ``AsyncLLM`` does, so a request vLLM refuses
is refused here, in vLLM's words, before it reaches the daemon.

The daemon's error codes become vLLM's exceptions, which vLLM's handlers turn into its error
objects: a refused request 400, an unknown model 404, a daemon that cannot serve now 503.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncGenerator, Iterable, Mapping
from http import HTTPStatus
from typing import Any

import msgspec
from vllm.engine.protocol import EngineClient
from vllm.exceptions import (
    GenerationError,
    GracefulHTTPError,
    RetryableRequestError,
    VLLMNotFoundError,
    VLLMValidationError,
)
from vllm.logprobs import Logprob
from vllm.lora.request import LoRARequest
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.engine.output_processor import RequestOutputCollector
from vllm.v1.serial_utils import MsgpackEncoder

from harli.client.inference import AsyncInferenceClient, RequestError
from harli.ipc.inference import Chunk, ErrorCode, TokenLogprob

logger = logging.getLogger(__name__)

# vLLM's encoder sends arrays past a size out of band, as extra frames; a ``Generate`` is one
# frame, so every array goes inline.
_INLINE_BYTES = 1 << 62


def _error(e: RequestError) -> Exception:
    """The vLLM exception whose handler answers as ``vllm serve`` would for the daemon's
    refusal ``e``."""
    if e.code in (ErrorCode.INVALID, ErrorCode.REJECTED, ErrorCode.TOO_LARGE):
        return VLLMValidationError(e.message)
    if e.code == ErrorCode.UNKNOWN_MODEL:
        return VLLMNotFoundError(e.message)
    if e.code in (ErrorCode.SHUTTING_DOWN, ErrorCode.UNAVAILABLE, ErrorCode.DECODE_DIED):
        return RetryableRequestError(e.message)
    if e.code == ErrorCode.TIMEOUT:
        return GracefulHTTPError(e.message, HTTPStatus.GATEWAY_TIMEOUT)
    return GenerationError(f"{e.code}: {e.message}")


def logprob_map(t: TokenLogprob) -> dict[int, Logprob]:
    """vLLM's ``{token_id: Logprob}`` at one place, in the order decode's vLLM made it."""
    if not t.top_ids:
        return {t.token_id: Logprob(t.logprob, t.rank, t.token)}
    return {i: Logprob(lp, rank, tok) for i, lp, rank, tok in
            zip(t.top_ids, t.top_logprobs, t.top_ranks or [None] * len(t.top_ids),
                t.top_tokens or [None] * len(t.top_ids), strict=True)}


class _Gathered:
    """One completion's deltas gathered (for a request that wants only the final output)."""

    def __init__(self, index: int) -> None:
        self.out = CompletionOutput(index=index, text="", token_ids=[], cumulative_logprob=None,
                                    logprobs=None)

    def add(self, c: Chunk) -> None:
        out = self.out
        out.text += c.text
        out.token_ids.extend(c.token_ids)  # type: ignore[attr-defined]
        if c.logprobs is not None:
            gathered: list[dict[int, Logprob]] = list(out.logprobs or [])  # type: ignore[arg-type]
            out.logprobs = gathered + [logprob_map(t) for t in c.logprobs]
        if c.cumulative_logprob is not None:
            out.cumulative_logprob = c.cumulative_logprob
        if c.finish_reason is not None:
            out.finish_reason, out.stop_reason = c.finish_reason, c.stop_reason


def _delta(c: Chunk) -> CompletionOutput:
    return CompletionOutput(
        index=c.index, text=c.text, token_ids=list(c.token_ids),
        cumulative_logprob=c.cumulative_logprob,
        logprobs=None if c.logprobs is None else [logprob_map(t) for t in c.logprobs],
        finish_reason=c.finish_reason, stop_reason=c.stop_reason)


async def _pump(outputs: AsyncGenerator[RequestOutput, None],
                collector: RequestOutputCollector) -> None:
    try:
        async for out in outputs:
            collector.put(out)
    except Exception as e:  # the consumer raises it (vLLM's error, or the daemon's)
        collector.put(e)


def _prompt_logprobs(rows: list[TokenLogprob | None] | None) -> Any:
    return None if rows is None else [None if t is None else logprob_map(t) for t in rows]


class DaemonEngineClient(EngineClient):
    """vLLM's engine client whose engine is the daemon (``inference``: a native client on
    its inference endpoint). ``vllm_config`` is the decode engine's configuration, built in
    this process from the same settings; it loads the tokenizer, never the weights."""

    def __init__(self, vllm_config: Any, inference: AsyncInferenceClient,
                 max_n: int = 16) -> None:
        from vllm.renderers import renderer_from_config
        from vllm.v1.engine.input_processor import InputProcessor

        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.renderer = renderer_from_config(vllm_config)
        self.input_processor = InputProcessor(vllm_config, self.renderer)
        self.inference = inference
        self.max_n = max_n
        self._encoder = MsgpackEncoder(size_threshold=_INLINE_BYTES)
        self._ids = itertools.count(1)
        self._prefix = f"http-{os.getpid()}"
        self.daemon_ready = False  # the daemon answered; decode may still be starting
        self._dead: BaseException | None = None

    # -- generation --------------------------------------------------------------------------

    async def generate(
            self, prompt: Any, sampling_params: SamplingParams, request_id: str, *,
            prompt_text: str | None = None, lora_request: LoRARequest | None = None,
            tokenization_kwargs: dict[str, Any] | None = None,
            trace_headers: Mapping[str, str] | None = None, priority: int = 0,
            data_parallel_rank: int | None = None, session_id: str | None = None,
            kv_hints: Any = None, reasoning_ended: bool | None = None,
            reasoning_parser_kwargs: dict[str, Any] | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        frame: Any = self._encoder.encode(sampling_params)[0]
        raw = msgspec.Raw(bytes(frame))
        # vLLM's checks, in this process, as AsyncLLM runs them before the engine sees it.
        processed = self.input_processor.process_inputs(
            request_id, prompt, sampling_params, supported_tasks=("generate",),
            lora_request=lora_request, tokenization_kwargs=tokenization_kwargs,
            trace_headers=trace_headers, priority=priority, session_id=session_id)
        prompt_ids = list(processed.prompt_token_ids or ())
        text = prompt_text if prompt_text is not None else (
            prompt.get("prompt") if isinstance(prompt, dict) else None)
        final_only = sampling_params.output_kind == RequestOutputKind.FINAL_ONLY
        outputs = self._outputs(raw, request_id, text, prompt_ids, final_only, lora_request)
        if final_only:
            async for out in outputs:
                yield out
            return
        # As AsyncLLM hands them over: a task puts the outputs into vLLM's collector, which
        # merges the deltas this stream has not taken yet (a stream that falls behind gets
        # fewer, larger chunks, as from vllm serve).
        collector = RequestOutputCollector(RequestOutputKind.DELTA, request_id)
        pump = asyncio.get_running_loop().create_task(_pump(outputs, collector))
        try:
            while True:
                merged = collector.get_nowait() or await collector.get()
                assert isinstance(merged, RequestOutput)  # a generation model's
                yield merged
                if merged.finished:
                    break
        finally:
            pump.cancel()  # the client went away: the daemon's stream is cancelled

    async def _outputs(self, raw: msgspec.Raw, request_id: str, text: str | None,
                       prompt_ids: list[int], final_only: bool,
                       lora_request: LoRARequest | None) -> AsyncGenerator[RequestOutput, None]:
        """The daemon's stream of this request as vLLM ``RequestOutput``s: a delta per chunk,
        or the gathered final output (``final_only``)."""
        gathered: dict[int, _Gathered] = {}
        prompt_logprobs: Any = None
        num_cached: int | None = None
        num_created: int | None = None
        # Unique on the daemon's link: vLLM's ids come from the client (X-Request-Id).
        wire_id = f"{self._prefix}-{next(self._ids)}"
        ended = False
        try:
            async for chunk in self.inference.generate(
                    prompt_ids, request_id=wire_id, sampling_params=raw,
                    model=None if lora_request is None else lora_request.lora_name):
                if chunk.prompt_logprobs is not None:
                    prompt_logprobs = _prompt_logprobs(chunk.prompt_logprobs)
                if chunk.num_cached_tokens is not None:
                    num_cached = chunk.num_cached_tokens
                if chunk.num_cache_creation_tokens is not None:
                    num_created = chunk.num_cache_creation_tokens
                ended = chunk.finished
                if final_only:
                    gathered.setdefault(chunk.index, _Gathered(chunk.index)).add(chunk)
                    if chunk.finished:
                        yield self._output(request_id, text, prompt_ids, prompt_logprobs,
                                           [g.out for _, g in sorted(gathered.items())],
                                           True, num_cached, num_created, lora_request)
                    continue
                yield self._output(request_id, text, prompt_ids, prompt_logprobs,
                                   [_delta(chunk)], chunk.finished, num_cached, num_created,
                                   lora_request)
                prompt_logprobs = None  # with the first output only, as vLLM sends it
        except RequestError as e:
            ended = True  # the daemon ended it
            raise _error(e) from None
        finally:
            if not ended:
                # The client went away (vLLM's layer closed this stream, maybe under a
                # cancellation, where an await would not run): decode must not go on
                # generating for nobody.
                asyncio.get_running_loop().create_task(self._cancel(wire_id))

    async def _cancel(self, wire_id: str) -> None:
        try:
            await self.inference.cancel(wire_id)
        except Exception:
            logger.exception("[http] abort of %s failed", wire_id)

    def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
        """``http.max_n``: the most completions one request may ask for."""
        if n > self.max_n:
            raise VLLMValidationError(
                f"n = {n} is more completions than this server gives one request "
                f"(http.max_n = {self.max_n})", parameter="n", value=n)

    @staticmethod
    def _output(request_id: str, prompt: str | None, prompt_ids: list[int],
                prompt_logprobs: Any, outputs: list[CompletionOutput], finished: bool,
                num_cached: int | None, num_created: int | None,
                lora_request: LoRARequest | None) -> RequestOutput:
        return RequestOutput(request_id=request_id, prompt=prompt, prompt_token_ids=prompt_ids,
                             prompt_logprobs=prompt_logprobs, outputs=outputs,
                             finished=finished, lora_request=lora_request,
                             num_cached_tokens=num_cached,
                             num_cache_creation_tokens=num_created)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise VLLMValidationError("this server runs a generation model: no pooling requests")

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """Closing ``generate``'s stream aborts its request in decode (the native client
        sends the abort); ids vLLM's layer names are not the daemon's."""

    # -- state -----------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._dead is None

    @property
    def is_stopped(self) -> bool:
        return self._dead is not None

    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def dead_error(self) -> BaseException:
        return EngineDeadError(str(self._dead) if self._dead else "the daemon went away")

    async def check_health(self) -> None:
        """Raises while decode is not serving (starting or restarting): /health's 503."""
        welcome = await self.inference.hello()
        if not welcome.ready:
            raise EngineDeadError("decode is not serving (starting or restarting)")

    async def get_supported_tasks(self) -> Any:
        return ("generate",)

    async def is_tracing_enabled(self) -> bool:
        return False

    async def do_log_stats(self) -> None:
        """The daemon logs and exports the engine's statistics."""

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Adapters are registered with the daemon (``load_lora_adapter``) and loaded by
        decode the first time a request names one."""
        return True

    # -- what a remote engine does not offer here ------------------------------------------

    async def notify_kv_transfer_request_rejected(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def start_profile(self, *args: Any, **kwargs: Any) -> None:
        raise VLLMValidationError("profiling is not offered through this server")

    async def stop_profile(self) -> None:
        raise VLLMValidationError("profiling is not offered through this server")

    async def reset_mm_cache(self) -> None:
        return None

    async def reset_encoder_cache(self) -> None:
        return None

    async def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        return False

    async def sleep(self, *args: Any, **kwargs: Any) -> None:
        raise VLLMValidationError("sleep mode is not offered: the daemon schedules decode")

    async def release_kv_cache_memory(self) -> None:
        return None

    async def wake_up(self, tags: list[str] | None = None) -> bool:
        return False

    async def is_sleeping(self) -> bool:
        return False

    async def pause_generation(self, *args: Any, **kwargs: Any) -> None:
        raise VLLMValidationError("pausing generation is not offered: the daemon schedules "
                                  "decode")

    async def resume_generation(self) -> None:
        return None

    async def is_paused(self) -> bool:
        return False

    def shutdown(self, timeout: float | None = None) -> None:
        return None
