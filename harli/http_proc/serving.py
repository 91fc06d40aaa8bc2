"""Completions and chat completions: an OpenAI request turned into the daemon's ``Generate``
requests, and their token streams into OpenAI's responses (one JSON body, or server-sent
events ending in ``data: [DONE]``).

Prompts are tokenized here, as vLLM's API server does, so a prompt too long for the model is
refused before it reaches decode, and usage counts are exact. ``n`` choices are ``n``
requests (seed + i when seeded), streamed as they come. A stream whose client goes away aborts
its requests in decode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from harli.client.inference import RequestError
from harli.http_proc.daemon_link import DaemonLink
from harli.http_proc.errors import ApiError, bad_field
from harli.http_proc.protocol import ChatCompletionRequest, CompletionRequest, _Sampling
from harli.ipc.inference import Chunk, TokenLogprob

logger = logging.getLogger(__name__)

# The daemon's finish reasons OpenAI knows; the others ("abort", "shutdown", "error",
# "adapter_removed") pass through as they are, as vLLM's server passes "abort".
_FINISH = {"length": "length", "stop": "stop"}


@dataclass
class Choice:
    """One choice's request to decode and what came back."""

    index: int
    prompt_ids: list[int]
    request_id: str
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Generation:
    """The choices of one OpenAI request, sent to the daemon and streamed back."""

    def __init__(self, link: DaemonLink, req: _Sampling, prompts: Sequence[list[int]],
                 max_tokens: int, lora_model: str | None, logprobs: int | None = None) -> None:
        self.link = link
        self.req = req
        self.logprobs = logprobs  # alternatives per token; None: no log-probabilities
        self.max_tokens = max_tokens
        self.model = lora_model
        self.created = int(time.time())
        base_id = req.request_id or uuid.uuid4().hex
        self.choices = [Choice(index=i * req.n + k, prompt_ids=list(p),
                               request_id=f"http-{base_id}-{i * req.n + k}")
                        for i, p in enumerate(prompts) for k in range(req.n)]
        self._done = False

    def _kwargs(self, c: Choice) -> dict[str, Any]:
        r = self.req
        stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        seed = None if r.seed is None else r.seed + c.index
        return {"request_id": c.request_id, "max_tokens": self.max_tokens,
                "temperature": 1.0 if r.temperature is None else r.temperature,
                "top_p": 1.0 if r.top_p is None else r.top_p,
                "top_k": -1 if r.top_k is None else r.top_k, "seed": seed, "stop": stop,
                "stop_token_ids": list(r.stop_token_ids or []), "ignore_eos": r.ignore_eos,
                "model": self.model, "logprobs": self.logprobs}

    async def stream(self) -> AsyncIterator[tuple[Choice, Chunk]]:
        """Every choice's chunks as they come, in arrival order; the first error ends all
        (a refusal names its cause)."""
        queue: asyncio.Queue[tuple[Choice, Chunk | Exception | None]] = asyncio.Queue()

        async def one(c: Choice) -> None:
            try:
                async for chunk in self.link.inference.generate(c.prompt_ids, **self._kwargs(c)):
                    await queue.put((c, chunk))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # handed to the consumer, which raises it
                await queue.put((c, e))
                return
            await queue.put((c, None))

        tasks = [asyncio.create_task(one(c)) for c in self.choices]
        try:
            pending = len(tasks)
            while pending:
                c, item = await queue.get()
                if item is None:
                    pending -= 1
                    continue
                if isinstance(item, RequestError):
                    raise ApiError.from_daemon(item.code, item.message)
                if isinstance(item, Exception):
                    raise item
                c.text.append(item.text)
                c.tokens += len(item.token_ids)
                if item.logprobs:
                    c.logprobs.extend(item.logprobs)
                if item.finish_reason is not None:
                    c.finish_reason = _FINISH.get(item.finish_reason, item.finish_reason)
                    c.stop_reason = item.stop_reason
                yield c, item
            self._done = True
        finally:
            for t in tasks:
                t.cancel()
            if not self._done:
                # The client went away (or one choice failed): nothing must go on generating
                # for nobody. A task of its own: this generator may be closing under a
                # cancellation, where an await would not run.
                asyncio.get_running_loop().create_task(self._abort_open())

    async def _abort_open(self) -> None:
        for c in self.choices:
            if c.finish_reason is None:
                try:
                    await self.link.inference.abort(c.request_id)
                except RequestError:
                    pass  # it ended meanwhile
                except Exception:
                    logger.exception("[http] abort of %s failed", c.request_id)

    def usage(self) -> dict[str, int]:
        # Each prompt once, however many choices it has (OpenAI's count).
        prompt = sum(len(c.prompt_ids) for c in self.choices if c.index % self.req.n == 0)
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


class LogprobFormat:
    """Log-probabilities in OpenAI's shapes, with each token as the tokenizer decodes it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def completion(self, lps: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        """``choices[].logprobs`` of a completion: tokens, their log-probabilities, the top
        alternatives as {token: logprob}, and each token's offset in the text."""
        tokens = [self.text(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.text(i): x for i, x in
                                  zip(lp.top_ids, lp.top_logprobs, strict=True)}
                                 for lp in lps],
                "text_offset": offsets}

    def chat(self, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
        """``choices[].logprobs`` of a chat completion: ``content``, one entry per token."""
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            t = self.text(token_id)
            return {"token": t, "logprob": logprob, "bytes": list(t.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob),
                             "top_logprobs": [entry(i, x) for i, x in
                                              zip(lp.top_ids, lp.top_logprobs, strict=True)]}
                            for lp in lps]}


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


def max_tokens_for(asked: int | None, prompt_lens: Sequence[int], max_model_len: int,
                   param: str) -> int:
    """The output budget: ``asked``, or all the context left (vLLM's default for chat), after
    checking it and the prompt against the model's length in vLLM's words."""
    longest = max(prompt_lens)
    if longest >= max_model_len:
        raise bad_field("messages" if param == "max_completion_tokens" else "prompt",
                        f"This model's maximum context length is {max_model_len} tokens. "
                        f"However, your request has {longest} input tokens. Please reduce "
                        f"the length of the input messages.")
    room = max_model_len - longest
    if asked is None:
        return room
    if asked > room:
        raise bad_field(param, f"This model's maximum context length is {max_model_len} "
                               f"tokens. However, you requested {asked + longest} tokens "
                               f"({longest} in the messages, {asked} in the completion). "
                               f"Please reduce the length of the messages or completion.")
    return asked


def check_supported(req: _Sampling, max_n: int) -> None:
    for name, why in req.unsupported():
        raise bad_field(name, f"`{name}`: {why}")
    if req.n > max_n:
        raise bad_field("n", f"`n` is {req.n}; this server serves at most {max_n} choices "
                             f"per request (http.max_n)")


def completion_prompts(req: CompletionRequest, tokenizer: Any) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        items: list[str | list[int]] = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [list(p)]  # type: ignore[arg-type]
    else:
        items = list(p)  # type: ignore[arg-type]
    if not items:
        raise bad_field("prompt", "`prompt` is empty")
    out = []
    for item in items:
        ids = tokenizer(item).input_ids if isinstance(item, str) else list(item)
        if not ids:
            raise bad_field("prompt", "a prompt is empty")
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise bad_field("prompt", f"a prompt token id is outside the vocabulary "
                                      f"(0..{vocab - 1})")
        out.append(ids)
    return out


def chat_prompt(req: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise bad_field("messages", "the served model's tokenizer has no chat template; use "
                                    "/v1/completions")
    messages = []
    for m in req.messages:
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            d["content"] = "".join(part.text for part in m.content)
        messages.append(d)
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            **(req.chat_template_kwargs or {}))
    except Exception as e:  # a template's own error (a role it refuses, ...)
        raise bad_field("messages", f"the chat template cannot render these messages: "
                                    f"{e}") from None
    ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids
    return ids


async def completion_response(gen: Generation, req: CompletionRequest,
                              prompt_texts: list[str] | None,
                              fmt: LogprobFormat | None) -> dict[str, Any]:
    async for _ in gen.stream():
        pass
    choices = []
    for c in gen.choices:
        text = "".join(c.text)
        echoed = prompt_texts[c.index // req.n] if req.echo and prompt_texts else ""
        choices.append({"index": c.index, "text": echoed + text,
                        "logprobs": fmt.completion(c.logprobs, len(echoed)) if fmt else None,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": gen.created, "model": req.model, "choices": choices,
            "usage": gen.usage()}


async def completion_stream(gen: Generation, req: CompletionRequest,
                            prompt_texts: list[str] | None,
                            fmt: LogprobFormat | None) -> AsyncIterator[str]:
    rid, include_usage = f"cmpl-{uuid.uuid4().hex}", _include_usage(req)
    head = {"id": rid, "object": "text_completion", "created": gen.created, "model": req.model}
    offsets = {c.index: 0 for c in gen.choices}  # each choice's text so far, for text_offset
    try:
        if req.echo and prompt_texts is not None:
            for c in gen.choices:
                echoed = prompt_texts[c.index // req.n]
                offsets[c.index] = len(echoed)
                yield sse({**head, "choices": [{"index": c.index, "logprobs": None,
                                                "text": echoed, "finish_reason": None}]})
        async for c, chunk in gen.stream():
            if not chunk.token_ids and chunk.finish_reason is None:
                continue  # an event per token, as vLLM's server: text may be held back
            lps = (fmt.completion(chunk.logprobs or [], offsets[c.index]) if fmt else None)
            offsets[c.index] += len(chunk.text)
            yield sse({**head, "choices": [{"index": c.index, "text": chunk.text,
                                            "logprobs": lps,
                                            "finish_reason": c.finish_reason,
                                            "stop_reason": c.stop_reason}],
                       **({"usage": None} if include_usage else {})})
        if include_usage:
            yield sse({**head, "choices": [], "usage": gen.usage()})
    except ApiError as e:
        yield sse(e.body())
    yield DONE


async def chat_response(gen: Generation, req: ChatCompletionRequest,
                        fmt: LogprobFormat | None) -> dict[str, Any]:
    async for _ in gen.stream():
        pass
    choices = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": fmt.chat(c.logprobs) if fmt else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
               for c in gen.choices]
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": gen.created, "model": req.model, "choices": choices,
            "usage": gen.usage()}


async def chat_stream(gen: Generation, req: ChatCompletionRequest,
                      fmt: LogprobFormat | None) -> AsyncIterator[str]:
    rid, include_usage = f"chatcmpl-{uuid.uuid4().hex}", _include_usage(req)
    head = {"id": rid, "object": "chat.completion.chunk", "created": gen.created,
            "model": req.model}
    extra = {"usage": None} if include_usage else {}
    try:
        for c in gen.choices:  # OpenAI's first delta of each choice carries the role
            yield sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant",
                                                                        "content": ""},
                                            "logprobs": None, "finish_reason": None}],
                       **extra})
        async for c, chunk in gen.stream():
            if not chunk.token_ids and chunk.finish_reason is None:
                continue  # an event per token, as vLLM's server: text may be held back
            delta = {"content": chunk.text} if chunk.token_ids or chunk.text else {}
            yield sse({**head, "choices": [{"index": c.index, "delta": delta,
                                            "logprobs": (fmt.chat(chunk.logprobs or [])
                                                         if fmt else None),
                                            "finish_reason": c.finish_reason,
                                            "stop_reason": c.stop_reason}], **extra})
        if include_usage:
            yield sse({**head, "choices": [], "usage": gen.usage()})
    except ApiError as e:
        yield sse(e.body())
    yield DONE


def _include_usage(req: _Sampling) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)
