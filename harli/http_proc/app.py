"""The OpenAI-compatible HTTP API: the FastAPI application and its routes.

Serving (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, vLLM's
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``), ``/health``, ``/version`` and
``/metrics`` (the daemon's Prometheus page, as ``vllm serve`` has it on its API port).
Every error is OpenAI's error object with its status (``errors.py``); API keys, the body
limit and the in-flight limit are checked before a route runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import harli
from harli.config import HarliConfig
from harli.http_proc.auth import ApiKeys
from harli.http_proc.daemon_link import DaemonLink
from harli.http_proc.errors import ApiError, error_body
from harli.http_proc.files import router as files_router
from harli.http_proc.fine_tuning import router as fine_tuning_router
from harli.http_proc.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    TextJsonRoute,
    UnloadLoraAdapterRequest,
)
from harli.http_proc.serving import (
    Generation,
    LogprobFormat,
    chat_prompt,
    chat_response,
    chat_stream,
    check_supported,
    completion_prompts,
    completion_response,
    completion_stream,
    max_tokens_for,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

OPEN_PATHS = ("/health", "/ping")  # answered without a key, as vllm serve answers /health


class Limits:
    """ASGI middleware, before any route: the API key, and the body's size (a declared
    ``Content-Length`` over the limit is refused before a byte is read; a chunked body is
    cut off when it passes it)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, max_body_bytes: int) -> None:
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if scope["path"] not in OPEN_PATHS:
            owner = self.keys.owner(headers.get("authorization"))
            if owner is None:
                await _send_error(send, ApiError(401, "invalid or missing API key: send "
                                                 "`Authorization: Bearer KEY`",
                                                 code="invalid_api_key"))
                return
            scope.setdefault("state", {})["owner"] = owner
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_error(send, self._too_large())
            return
        if declared is not None:
            await self.app(scope, receive, send)  # within the limit, as declared
            return
        # Chunked (no length declared): read it here, so that one past the limit is refused
        # with 413 as soon as it passes, before any route parses it.
        body, more = [], True
        seen = 0
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            body.append(msg.get("body", b""))
            seen += len(body[-1])
            more = msg.get("more_body", False)
            if seen > self.max_body_bytes:
                await _send_error(send, self._too_large())
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"request body over {self.max_body_bytes} bytes "
                             f"(http.max_body_bytes)", code="request_too_large")


async def _send_error(send: Send, e: ApiError) -> None:
    import json

    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class HttpState:
    """What the routes share: the daemon link, the tokenizer, limits and in-flight count."""

    def __init__(self, cfg: HarliConfig, tokenizer: Any) -> None:
        self.cfg = cfg
        self.link = DaemonLink(cfg)
        self.tokenizer = tokenizer
        self.in_flight = 0
        self._adapters: set[str] = set()

    async def resolve(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base model); 404 naming the
        served models when it names none of them."""
        if model == self.link.base_model:
            return None
        if model not in self._adapters:  # registered since we last looked?
            models = await self.link.models()
            self._adapters = {m.name for m in models if m.kind == "adapter"}
            if model not in self._adapters:
                names = ", ".join([self.link.base_model, *sorted(self._adapters)])
                raise ApiError(404, f"The model `{model}` does not exist. Served models: "
                                    f"{names}", param="model", code="model_not_found")
        return model

    def forget(self, adapter: str) -> None:
        """An adapter removed through this front (one removed otherwise is refused by the
        daemon, in its own words)."""
        self._adapters.discard(adapter)

    def admit(self) -> None:
        if self.in_flight >= self.cfg.http.max_concurrent_requests:
            raise ApiError(429, f"{self.in_flight} requests in flight, the most this server "
                                f"takes (http.max_concurrent_requests); retry later",
                           code="too_many_requests")


def build_app(cfg: HarliConfig, tokenizer: Any, keys: ApiKeys,
              on_ready: Callable[[], None] = lambda: None) -> FastAPI:
    state = HttpState(cfg, tokenizer)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.link.start()
        on_ready()
        try:
            yield
        finally:
            await state.link.close()

    app = FastAPI(title="harli", version=harli.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.harli = state
    app.router.route_class = TextJsonRoute
    _error_handlers(app)
    app.include_router(files_router)
    app.include_router(fine_tuning_router)

    @app.get("/health")
    async def health() -> Any:
        if await state.link.ready():
            return PlainTextResponse("")
        raise ApiError(503, "decode is not serving (starting or restarting)")

    @app.get("/metrics")
    async def metrics() -> Any:
        """The daemon's page: vLLM's metric contract and Harli's own, as on metrics.port."""
        page = await state.link.control("metrics_page")
        return PlainTextResponse(page.text, media_type=page.content_type)

    @app.get("/version")
    async def version() -> Any:
        return {"version": harli.__version__}

    @app.get("/v1/models")
    async def models() -> Any:
        data = []
        for m in await state.link.models():
            data.append({"id": m.name, "object": "model",
                         "created": int(m.created_s or time.time()), "owned_by": "harli",
                         "root": m.path,
                         "parent": None if m.kind == "base" else state.link.base_model,
                         "max_model_len": state.link.max_model_len})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        check_supported(req, cfg.http.max_n)
        lora = await state.resolve(req.model)
        prompts = completion_prompts(req, state.tokenizer)
        max_tokens = max_tokens_for(req.max_tokens if req.max_tokens is not None else 16,
                                    [len(p) for p in prompts], state.link.max_model_len,
                                    "max_tokens")
        texts = ([state.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
                 if req.echo else None)
        gen = Generation(state.link, req, prompts, max_tokens, lora, req.logprobs)
        fmt = LogprobFormat(state.tokenizer) if req.logprobs is not None else None
        if req.stream:
            return _stream(state, completion_stream(gen, req, texts, fmt))
        return await _complete(state, raw, completion_response(gen, req, texts, fmt))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request) -> Any:
        check_supported(req, cfg.http.max_n)
        lora = await state.resolve(req.model)
        prompt = chat_prompt(req, state.tokenizer)
        asked, param = ((req.max_completion_tokens, "max_completion_tokens")
                        if req.max_completion_tokens is not None
                        else (req.max_tokens, "max_tokens"))
        max_tokens = max_tokens_for(asked, [len(prompt)], state.link.max_model_len, param)
        top = (req.top_logprobs or 0) if req.logprobs else None
        gen = Generation(state.link, req, [prompt], max_tokens, lora, top)
        fmt = LogprobFormat(state.tokenizer) if top is not None else None
        if req.stream:
            return _stream(state, chat_stream(gen, req, fmt))
        return await _complete(state, raw, chat_response(gen, req, fmt))

    @app.post("/v1/load_lora_adapter")
    async def load_lora(req: LoadLoraAdapterRequest) -> Any:
        if req.load_inplace:
            raise ApiError(400, "load_inplace is not supported: register the new adapter "
                                "under a new name", param="load_inplace")
        try:
            await state.link.control("add_adapter", req.lora_name, req.lora_path)
        except ApiError as e:
            if e.status == 409:  # vLLM answers a taken name with 400
                e.status, e.err_type = 400, "BadRequestError"
            raise
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added "
                                 f"successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(req: UnloadLoraAdapterRequest) -> Any:
        await state.link.control("remove_adapter", req.lora_name)
        state.forget(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed "
                                 f"successfully.")

    return app


def _stream(state: HttpState, body: AsyncIterator[str]) -> StreamingResponse:
    state.admit()
    state.in_flight += 1

    async def counted() -> AsyncIterator[str]:
        try:
            async for part in body:
                yield part
        finally:
            state.in_flight -= 1

    return StreamingResponse(counted(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _complete(state: HttpState, raw: Request, work: Awaitable[T]) -> T:
    """Run a non-streaming request, abandoning it (its requests aborted in decode) when the
    client disconnects first."""
    state.admit()
    state.in_flight += 1
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await raw.is_disconnected():
                task.cancel()
                raise ApiError(499, "client disconnected")
    finally:
        state.in_flight -= 1
        if not task.done():
            task.cancel()


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        kind = first.get("type", "")
        if kind == "json_invalid":
            msg = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            param = None
        elif kind == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        elif kind == "missing":
            msg = f"Missing required parameter: '{param}'"
        else:
            msg = f"Invalid value for '{param}': {first.get('msg', 'invalid')}"
        return JSONResponse(error_body(msg, "BadRequestError", param, "invalid_value"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "NotFoundError" if e.status_code == 404
                                       else "BadRequestError"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        logger.exception("[http] internal error")
        return JSONResponse(error_body("internal server error", "InternalServerError"),
                            status_code=500)
