"""The OpenAI request bodies the HTTP front accepts, as pydantic models (FastAPI validates
them; a wrong type or a field OpenAI does not know is a 400 naming it).

The fields are OpenAI's, plus the sampling extras vLLM's OpenAI server takes (``top_k``,
``ignore_eos``, ``stop_token_ids``, ...), so that clients written for ``vllm serve`` (its
``vllm bench serve`` load generator among them) work unchanged. A field whose feature the
daemon does not serve (penalties, tools, ...) is refused by name rather than
ignored: a client must not get an answer computed differently from what it asked.

A JSON body is read as text: a string in it that holds a lone UTF-16 surrogate (the escape
``"\\ud800"``, which Python's ``json`` reads) is refused as malformed JSON, since it could be
neither tokenized nor sent to the daemon nor written back in a reply. Integers the daemon's
protocol carries are bounded to 64 bits here, so a larger one is a 400 naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from harli.ipc.inference import MAX_LOGPROBS

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # vLLM's range for ``seed``
TokenId = Annotated[int, Field(ge=0, le=2**63 - 1)]
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: Any) -> str | None:
    """Where the first string of a parsed JSON value (a key or a value) that holds a lone
    UTF-16 surrogate is (``messages.0.content``); None when none does."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return f"`{path}`" if path else "the body"
        elif isinstance(v, dict):
            for key, item in v.items():
                if _SURROGATE.search(key):
                    return f"a key of `{path}`" if path else "a key of the body"
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(v))
    return None


class TextJsonRequest(Request):
    """A request whose JSON body must be text: a lone surrogate is a ``JSONDecodeError``,
    which FastAPI answers as malformed JSON (400)."""

    async def json(self) -> Any:
        value = await super().json()
        where = lone_surrogate(value)
        if where is not None:
            raise json.JSONDecodeError(f"{where} holds a lone UTF-16 surrogate (\\ud800 to "
                                       f"\\udfff), which is not text", "", 0)
        return value


class TextJsonRoute(APIRoute):
    """The route class of every router of the front: its handlers read ``TextJsonRequest``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(TextJsonRequest(request.scope, request.receive))

        return route


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Strict):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extras
    top_k: Annotated[int, Field(ge=-1, le=2**63 - 1)] | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    skip_special_tokens: bool = True
    request_id: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for each field set to a value the daemon cannot serve."""
        out = []
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                out.append((name, "penalties are not supported by this server"))
        if self.repetition_penalty not in (None, 1.0):
            out.append(("repetition_penalty", "penalties are not supported by this server"))
        if self.min_p:
            out.append(("min_p", "min_p sampling is not supported by this server"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported by this server"))
        if self.min_tokens:
            out.append(("min_tokens", "min_tokens is not supported by this server"))
        if not self.skip_special_tokens:
            out.append(("skip_special_tokens", "special tokens are always skipped"))
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.best_of not in (None, 1):
            out.append(("best_of", "best_of > 1 is not supported by this server"))
        if self.suffix:
            out.append(("suffix", "suffix is not supported by this server"))
        return out


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Clients send more than OpenAI documents here (``name``, ``tool_calls`` of an
    # assistant turn, ...): accepted and passed to the chat template, as vLLM does.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.top_logprobs and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        if self.tools:
            out.append(("tools", "tool calling is not supported by this server"))
        if self.tool_choice not in (None, "none", "auto"):
            out.append(("tool_choice", "tool calling is not supported by this server"))
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            out.append(("response_format", "only the text response format is supported"))
        return out


class LoadLoraAdapterRequest(_Strict):
    """vLLM's ``POST /v1/load_lora_adapter``."""

    lora_name: Annotated[str, Field(min_length=1)]
    lora_path: Annotated[str, Field(min_length=1)]
    load_inplace: bool = False


class UnloadLoraAdapterRequest(_Strict):
    """vLLM's ``POST /v1/unload_lora_adapter``."""

    lora_name: Annotated[str, Field(min_length=1)]
    lora_int_id: int | None = None
