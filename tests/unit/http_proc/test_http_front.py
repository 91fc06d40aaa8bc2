"""The HTTP front's pure parts: API keys, the daemon's error codes as HTTP statuses, the
request models' strictness, output budgets against the model's length, and the limits checked
before any route (key, body size), on a bare ASGI app."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from harli.config import ConfigError, load
from harli.http_proc.app import Limits
from harli.http_proc.auth import NO_KEYS_OWNER, ApiKeys
from harli.http_proc.errors import ApiError
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


def test_limits_refuse_a_lone_surrogate_in_json_and_count_requests_in_flight() -> None:
    c = _limited(max_body_bytes=1000, keys=["k"])
    auth = {"Authorization": "Bearer k", "Content-Type": "application/json"}
    r = c.post("/v1/x", content=b'{"prompt": "a\\ud800"}', headers=auth)
    assert r.status_code == 400 and "`prompt` holds a lone UTF-16 surrogate" in \
        r.json()["error"]["message"]
    pair = c.post("/v1/x", content=b'{"prompt": "\\ud83d\\ude00"}', headers=auth)
    assert pair.status_code == 200  # a surrogate pair is one character
    full = TestClient(Limits(Starlette(routes=[Route("/v1/x", lambda r: None)]),
                             ApiKeys(["k"]), 100, max_in_flight=0))
    r = full.get("/v1/x", headers={"Authorization": "Bearer k"})
    assert r.status_code == 429 and "http.max_concurrent_requests" in \
        r.json()["error"]["message"]


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
