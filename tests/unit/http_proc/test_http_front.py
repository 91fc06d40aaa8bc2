"""The HTTP front's pure parts: API keys, the daemon's error codes as HTTP statuses, the
request models' strictness, output budgets against the model's length, and the limits checked
before any route (key, body size), on a bare ASGI app."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from harli.config import ConfigError, load
from harli.http_proc.app import Limits
from harli.http_proc.auth import NO_KEYS_OWNER, ApiKeys
from harli.http_proc.errors import ApiError
from harli.http_proc.protocol import ChatCompletionRequest, CompletionRequest
from harli.http_proc.serving import check_supported, max_tokens_for
from harli.ipc.inference import ErrorCode


def test_keys_file_parsing_and_owners(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# ops\n\nsk-a\n  sk-b  \n")
    keys = ApiKeys.from_file(str(f))
    assert keys.required
    a, b = keys.owner("Bearer sk-a"), keys.owner("Bearer sk-b")
    assert a and b and a != b and "sk-a" not in a  # a digest, never the key
    assert keys.owner("Bearer sk-a") == a
    for bad in (None, "", "sk-a", "Bearer sk-c", "Basic sk-a"):
        assert keys.owner(bad) is None
    assert ApiKeys.from_file("").owner(None) == NO_KEYS_OWNER
    (tmp_path / "empty").write_text("# none\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.from_file(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot read"):
        ApiKeys.from_file(str(tmp_path / "missing"))


@pytest.mark.parametrize(("code", "status"), [
    (ErrorCode.INVALID, 400), (ErrorCode.REJECTED, 400), (ErrorCode.TOO_LARGE, 413),
    (ErrorCode.UNKNOWN_MODEL, 404), (ErrorCode.NOT_FOUND, 404), (ErrorCode.CONFLICT, 409),
    (ErrorCode.UNAVAILABLE, 503), (ErrorCode.DECODE_DIED, 503),
    (ErrorCode.SHUTTING_DOWN, 503), (ErrorCode.TIMEOUT, 504), ("something new", 500)])
def test_daemon_errors_map_to_openai_statuses(code: str, status: int) -> None:
    e = ApiError.from_daemon(code, "why")
    assert e.status == status
    assert e.body() == {"error": {"message": "why", "type": e.err_type, "param": None,
                                  "code": code}}


def test_request_models_refuse_unknown_fields_and_name_unserved_features() -> None:
    with pytest.raises(ValidationError, match="bogus"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "bogus": 1})
    ok = CompletionRequest.model_validate({"model": "m", "prompt": "x", "ignore_eos": True,
                                           "top_k": 5, "stream_options": {"include_usage": True}})
    check_supported(ok, max_n=4)
    for body, field in (({"min_p": 0.1}, "min_p"), ({"presence_penalty": 0.5},
                        "presence_penalty"), ({"best_of": 3}, "best_of"), ({"n": 5}, "n")):
        req = CompletionRequest.model_validate({"model": "m", "prompt": "x", **body})
        with pytest.raises(ApiError) as e:
            check_supported(req, max_n=4)
        assert e.value.status == 400 and e.value.param == field
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}],
         "tools": [{"type": "function"}]})
    with pytest.raises(ApiError, match="tool calling"):
        check_supported(chat, max_n=4)
    top_alone = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    with pytest.raises(ApiError, match="needs logprobs: true"):
        check_supported(top_alone, max_n=4)
    with pytest.raises(ValidationError, match="logprobs"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 21})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})


def test_output_budget_against_the_models_length() -> None:
    assert max_tokens_for(None, [10, 30], 100, "max_tokens") == 70  # all that is left
    assert max_tokens_for(20, [10], 100, "max_tokens") == 20
    with pytest.raises(ApiError, match="you requested 121 tokens") as e:
        max_tokens_for(91, [30], 100, "max_tokens")
    assert e.value.param == "max_tokens"
    with pytest.raises(ApiError, match="your request has 100 input tokens"):
        max_tokens_for(1, [100], 100, "max_tokens")


def _limited(max_body_bytes: int = 100, keys: list[str] | None = None) -> TestClient:
    async def echo(request: Request) -> PlainTextResponse:
        owner = request.scope.get("state", {}).get("owner")
        return PlainTextResponse(f"{len(await request.body())} {owner}")

    app = Starlette(routes=[Route("/v1/x", echo, methods=["POST", "GET"]),
                            Route("/health", echo)])
    return TestClient(Limits(app, ApiKeys(keys or []), max_body_bytes))


def test_limits_check_keys_and_body_size_before_the_route() -> None:
    c = _limited(keys=["k"])
    assert c.get("/health").status_code == 200  # open
    r = c.post("/v1/x", content=b"abc")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert c.post("/v1/x", content=b"abc", headers={"Authorization": "Bearer k"}).text \
        .startswith("3 ")
    r = c.post("/v1/x", content=b"x" * 101, headers={"Authorization": "Bearer k"})
    assert r.status_code == 413 and "http.max_body_bytes" in r.json()["error"]["message"]

    def chunked() -> object:
        yield b"x" * 60
        yield b"x" * 60

    r = c.post("/v1/x", content=chunked(), headers={"Authorization": "Bearer k"})
    assert r.status_code == 413
    small = c.post("/v1/x", content=iter([b"x" * 40, b"y" * 40]),
                   headers={"Authorization": "Bearer k"})
    assert small.status_code == 200 and small.text.startswith("80 ")


def test_http_config_refuses_an_open_api_without_keys() -> None:
    with pytest.raises(ConfigError, match=r"http\.host: 0\.0\.0\.0 is reachable beyond this host"):
        load(None, ['http.host="0.0.0.0"'])
    assert load(None, ['http.host="0.0.0.0"', 'http.api_keys_file="/k"']).http.port == 8000
    assert load(None, ['http.host="0.0.0.0"', "http.port=0"]).http.port == 0  # off
    with pytest.raises(ConfigError, match=r"http\.max_n"):
        load(None, ["http.max_n=0"])
    with pytest.raises(ConfigError, match="ipc:// endpoints"):
        load(None, ['endpoints.inference="tcp://127.0.0.1:5555"',
                    'endpoints.curve_server_key="/k"'])
