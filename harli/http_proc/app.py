"""The OpenAI-compatible HTTP API: vLLM's own serving layer over the daemon, and Harli's files
and fine-tuning routes.

``build_front`` builds the application as ``vllm serve`` builds its own (vLLM's ``build_app``
and ``init_app_state``: its routers, request and response models, renderer, serving classes,
error handlers), with ``DaemonEngineClient`` as the engine and ``DaemonModels`` as the model
table, so every answer is vLLM's while every request is admitted and scheduled by the daemon.
Harli adds its files and fine-tuning routes (OpenAI's shapes) and the daemon's metrics page.
API keys, the body limit, the in-flight limit and text-only JSON are checked before any route
(``Limits``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler as fastapi_http_error
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from harli.config import HarliConfig
from harli.http_proc.auth import ApiKeys
from harli.http_proc.daemon_link import DaemonLink
from harli.http_proc.deps import HttpState
from harli.http_proc.errors import ApiError, error_body
from harli.http_proc.files import router as files_router
from harli.http_proc.fine_tuning import router as fine_tuning_router
from harli.http_proc.json_text import lone_surrogate
from harli.ipc.control import GetMetrics, MetricsPage

logger = logging.getLogger(__name__)

# Answered without a key, as vllm serve answers them (a router probing health or scraping
# metrics sends none), unless http.open_probes is off.
OPEN_PATHS = ("/health", "/ping", "/version", "/load", "/metrics")
# Harli's own routes: OpenAI's error shapes (vLLM's elsewhere).
HARLI_PREFIXES = ("/v1/files", "/v1/fine_tuning")


class Limits:
    """ASGI middleware, before any route: the API key, and the body's size (a declared
    ``Content-Length`` over the limit is refused before a byte is read; a chunked body is
    cut off when it passes it)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, max_body_bytes: int,
                 max_in_flight: int = 1 << 30,
                 body_models: dict[str, type[BaseModel]] | None = None,
                 open_probes: bool = True) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = OPEN_PATHS if open_probes else ()
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        # Route -> the request model its JSON body must fit: a value its own validators
        # fail on with anything but a validation error (vLLM's would answer 500) is a 400.
        self.body_models = body_models or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        owner = self.keys.owner(headers.get("authorization"))
        if owner is not None:
            scope.setdefault("state", {})["owner"] = owner
        if scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if owner is None:
            await _send_error(send, ApiError(401, "invalid or missing API key: send "
                                             "`Authorization: Bearer KEY`",
                                             code="invalid_api_key"))
            return
        if self.in_flight >= self.max_in_flight:
            await _send_error(send, ApiError(
                429, f"{self.in_flight} requests in flight, the most this server takes "
                     f"(http.max_concurrent_requests); retry later", code="too_many_requests"))
            return
        self.in_flight += 1
        try:
            await self._limited(scope, receive, send, headers)
        finally:
            self.in_flight -= 1

    async def _limited(self, scope: Scope, receive: Receive, send: Send,
                       headers: dict[str, str]) -> None:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_error(send, self._too_large())
            return
        json_body = "json" in headers.get("content-type", "")
        if declared is not None and not json_body:
            await self.app(scope, receive, send)  # within the limit, as declared
            return
        # Read here: chunked (no length declared), so that one past the limit is refused with
        # 413 as soon as it passes, before any route parses it; JSON, so that a lone
        # surrogate is refused before a route (vLLM's would fail on it with a 500).
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
        if json_body:
            refused = self._check_json(scope["path"], b"".join(body))
            if refused is not None:
                await _send_error(send, refused)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check_json(self, path: str, body: bytes) -> ApiError | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None  # not JSON: the route says so in its own words
        except RecursionError:
            return ApiError(400, "the body is not valid JSON: it nests deeper than this server "
                                 "reads", code="invalid_json")
        where = lone_surrogate(value)
        if where is not None:
            return ApiError(400, f"the body is not valid JSON: {where} holds a lone UTF-16 "
                                 f"surrogate (\\ud800 to \\udfff), which is not text",
                            code="invalid_json")
        model = self.body_models.get(path)
        if model is None:
            return None
        try:
            model.model_validate(value)
        except ValidationError:
            return None  # the route answers it, in vLLM's words
        except Exception as e:
            return ApiError(400, f"the request does not validate: {type(e).__name__}: {e}",
                            code=400, err_type="BadRequestError")
        return None

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


def serve_args(cfg: HarliConfig, served_name: str) -> Any:
    """``vllm serve``'s arguments for the application: the model and its served name (the
    engine settings are the decode process's, ``harli.vllm_args``)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", str(cfg.model_path), "--served-model-name", served_name,
            "--disable-uvicorn-access-log"]
    if cfg.model.max_model_len:
        argv += ["--max-model-len", str(cfg.model.max_model_len)]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)  # type: ignore[no-untyped-call]
    validate_parsed_serve_args(args)
    return args


async def build_front(cfg: HarliConfig, link: DaemonLink) -> FastAPI:
    """vLLM's application over the daemon (``link`` started: it knows the served model's
    name), with Harli's routes."""
    # vLLM's runtime adapter path: a name its table lacks is looked up (DaemonModels asks
    # the daemon), and /v1/load_lora_adapter registers with the daemon.
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    from harli.http_proc.engine_client import DaemonEngineClient
    from harli.http_proc.models import DaemonModels
    from harli.vllm_args import engine_args

    vllm_config = engine_args(cfg, str(cfg.model_path)).create_engine_config()
    args = serve_args(cfg, link.base_model)
    client = DaemonEngineClient(vllm_config, link.inference, cfg.http.max_n)
    app = build_app(args, ("generate",), client.model_config)
    await init_app_state(client, app.state, args, ("generate",))
    DaemonModels.adopt(app.state.openai_serving_models, link)
    _daemon_metrics(app, link)
    add_harli_routes(app, cfg, link)
    return app


def add_harli_routes(app: FastAPI, cfg: HarliConfig, link: Any) -> None:
    """Harli's files and fine-tuning routes, with OpenAI's error shapes, on ``app`` (vLLM's,
    or a bare one in tests)."""
    app.state.harli = HttpState(cfg, link)
    app.include_router(files_router)
    app.include_router(fine_tuning_router)
    _harli_errors(app)
    # Starlette captures the handlers when it builds the middleware stack, which vLLM's
    # set-up may have done already: build it again with ours.
    app.middleware_stack = None


def vllm_body_models() -> dict[str, type[BaseModel]]:
    """vLLM's request models of the generation routes, for ``Limits``."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
            "/v1/responses": ResponsesRequest}


def _daemon_metrics(app: FastAPI, link: DaemonLink) -> None:
    """``/metrics`` is the daemon's page (vLLM's metric families as decode's engine records
    them, and Harli's), in place of this process's registry, which sees no engine. The
    series that name tenants' jobs need a key (or no keys configured)."""
    app.router.routes[:] = [r for r in app.router.routes
                            if getattr(r, "path", None) != "/metrics"]

    @app.get("/metrics")
    async def metrics(request: Request) -> Any:
        keyed = "owner" in request.scope.get("state", {})
        page = await link.call(GetMetrics(tenant_series=keyed), MetricsPage)
        return PlainTextResponse(page.text, media_type=page.content_type)


def _harli_errors(app: FastAPI) -> None:
    """OpenAI's error shapes on Harli's routes; vLLM's handlers everywhere else."""
    vllm_invalid = app.exception_handlers.get(RequestValidationError)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Any:
        # A path no route has, a body that is not even text: FastAPI's {"detail"} on vLLM's
        # routes (as vllm serve answers), OpenAI's error object on Harli's.
        if not request.url.path.startswith(HARLI_PREFIXES):
            return await fastapi_http_error(request, e)
        return JSONResponse(error_body(str(e.detail), "NotFoundError" if e.status_code == 404
                                       else "BadRequestError"), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Any:
        if vllm_invalid is not None and not request.url.path.startswith(HARLI_PREFIXES):
            return await vllm_invalid(request, e)  # type: ignore[misc]
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
