"""The OpenAI-compatible HTTP API on the real daemon, driven by the real ``openai`` SDK:
models, completions and chat (sync and async, streaming and not) equal to the native
protocol's greedy output, vLLM's adapter load/unload routes, API keys, and every bad input
answered with OpenAI's error object and status while the daemon keeps serving."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from harli.bench.local_daemon import LocalDaemon
from harli.bench.lora import make_adapter
from harli.client.control import ControlClient

from .conftest import free_port, make_daemon, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

KEY = "sk-test-harli"


class Api:
    def __init__(self, daemon: LocalDaemon, port: int) -> None:
        self.daemon = daemon
        self.base = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key=KEY, max_retries=0)
        self.http = httpx.Client(base_url=self.base, timeout=60,
                                 headers={"Authorization": f"Bearer {KEY}"})

    def wait(self) -> None:
        wait_http(self.base, self.daemon)

    def in_flight(self) -> int:
        with ControlClient(self.daemon.cfg.control_endpoint) as c:
            return sum(m.requests for m in c.models())


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Api]:
    base = tmp_path_factory.mktemp("http")
    keys = base / "keys"
    keys.write_text(f"# one key a line\n\n{KEY}\n")
    port = free_port()
    d = make_daemon(base / "d", tiny_model, f"http.port={port}",
                    f'http.api_keys_file="{keys}"', "http.max_n=4",
                    "http.max_body_bytes=200000")
    with d:
        a = Api(d, port)
        a.wait()
        yield a


def base_model(api: Api) -> str:
    return next(m.id for m in api.client.models.list().data if m.parent is None)


def test_models_list_and_the_daemon_status_name_the_url(api: Api) -> None:
    models = api.client.models.list().data
    assert [m.object for m in models] == ["model"] * len(models)
    base = [m for m in models if m.parent is None]
    assert len(base) == 1 and base[0].owned_by == "vllm"  # vLLM's own model card
    with ControlClient(api.daemon.cfg.control_endpoint) as c:
        st = c.status()
    assert st.http_url == api.base
    assert any(ch.name == "http" and ch.state == "running" for ch in st.children)
    assert api.http.get("/version").json()["version"]
    page = api.http.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:lora_requests_info",
                 "vllm:time_to_first_token_seconds", "harli_finetune_quota_level"):
        assert f"\n{name}" in page.text or page.text.startswith(name), name
    # Open, as vllm serve's is (a router scrapes with no key), without the tenants' series.
    open_page = httpx.get(f"{api.base}/metrics")
    assert open_page.status_code == 200 and "vllm:num_requests_running" in open_page.text
    assert "harli_job_" not in open_page.text and "harli_job_" in page.text
    assert httpx.get(f"{api.base}/v1/models").status_code == 401  # the API is behind the key


def test_completions_equal_the_native_protocol_greedy_output(api: Api) -> None:
    model = base_model(api)
    prompt = "The quick brown fox"
    r = api.client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                      temperature=0.0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == model
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 12
    with api.daemon.client() as c:
        native = c.complete(prompt, max_tokens=12, temperature=0.0, ignore_eos=True)
    assert r.choices[0].text == native.text
    assert r.usage.prompt_tokens == native.num_prompt_tokens
    # Streamed: the same text in pieces, then the usage chunk, then [DONE].
    parts, usage = [], None
    for chunk in api.client.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts) == native.text
    assert usage is not None and usage.completion_tokens == 12
    # n choices and a list of prompts: one choice per (prompt, n), each prompt counted once.
    r = api.client.completions.create(model=model, prompt=[prompt, "Once upon"], n=2,
                                      max_tokens=4, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage is not None and r.usage.completion_tokens == 16
    echo = api.client.completions.create(model=model, prompt=prompt, max_tokens=3,
                                         temperature=0.0, echo=True)
    assert echo.choices[0].text.startswith(prompt)


def test_logprobs_are_the_models_own(api: Api, tiny_model: Path) -> None:
    """Greedy tokens' log-probabilities over HTTP equal the native protocol's, which equal
    transformers' log-softmax of the same logits; the top alternatives come most likely
    first, the greedy token first of all."""
    import torch
    from transformers import AutoModelForCausalLM

    model = base_model(api)
    prompt = [5, 17, 42, 99, 7]
    with api.daemon.client() as c:
        native = [lp for chunk in c.generate(prompt, max_tokens=5, temperature=0.0,
                                             ignore_eos=True, logprobs=3)
                  for lp in chunk.logprobs or []]
    assert len(native) == 5
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + [lp.token_id for lp in native]])
    with torch.no_grad():
        logsm = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
    for i, lp in enumerate(native):
        row = logsm[len(prompt) - 1 + i]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=2e-3)
        assert lp.top_ids[0] == lp.token_id == int(row.argmax())  # greedy
        assert len(lp.top_ids) == 3 and lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
    r = api.client.completions.create(model=model, prompt=prompt, max_tokens=5,
                                      temperature=0.0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    got = r.choices[0].logprobs
    assert got is not None and got.token_logprobs is not None and got.top_logprobs is not None
    assert got.token_logprobs == pytest.approx([lp.logprob for lp in native], abs=1e-6)
    assert [len(t) for t in got.top_logprobs] == [3] * 5 or all(len(t) <= 3
                                                                for t in got.top_logprobs)
    chat = api.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "2 + 2 ="}], max_tokens=4,
        temperature=0.0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0.0 for t in content)


def test_chat_sync_async_streaming_and_not(api: Api) -> None:
    model = base_model(api)
    msgs = [{"role": "system", "content": "You add numbers."},
            {"role": "user", "content": "2 + 2 ="}]
    r = api.client.chat.completions.create(model=model, messages=msgs, max_tokens=8,
                                           temperature=0.0)  # type: ignore[arg-type]
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       api.client.chat.completions.create(
                           model=model, messages=msgs, max_completion_tokens=8,  # type: ignore[arg-type]
                           temperature=0.0, stream=True) if c.choices)
    assert streamed == text

    async def both() -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=f"{api.base}/v1", api_key=KEY, max_retries=0)
        rs = await asyncio.gather(*(client.chat.completions.create(
            model=model, messages=msgs, max_tokens=8, temperature=0.0)  # type: ignore[arg-type]
            for _ in range(3)))
        await client.close()
        return [x.choices[0].message.content for x in rs]

    assert asyncio.run(both()) == [text] * 3


def test_adapters_load_call_and_unload_over_http(api: Api, tmp_path: Path,
                                                 tiny_model: Path) -> None:
    model = base_model(api)
    path = make_adapter(tiny_model, tmp_path / "a", seed=5)
    ok = api.http.post("/v1/load_lora_adapter", json={"lora_name": "mine",
                                                      "lora_path": str(path)})
    assert ok.status_code == 200 and "added successfully" in ok.text
    assert "mine" in {m.id for m in api.client.models.list().data}
    prompt = "The quick brown fox"
    out = {m: api.client.completions.create(model=m, prompt=prompt, max_tokens=8,
                                            temperature=0.0).choices[0].text
           for m in (model, "mine")}
    assert out["mine"] != out[model]  # the adapter's own output
    again = api.http.post("/v1/load_lora_adapter", json={"lora_name": "mine",
                                                         "lora_path": str(path)})
    assert again.status_code == 400 and "mine" in again.json()["error"]["message"]
    gone = api.http.post("/v1/unload_lora_adapter", json={"lora_name": "mine"})
    assert gone.status_code == 200
    with pytest.raises(openai.NotFoundError, match="mine"):
        api.client.completions.create(model="mine", prompt=prompt, max_tokens=2)
    assert api.http.post("/v1/unload_lora_adapter",
                         json={"lora_name": "mine"}).status_code == 404


def test_api_keys(api: Api) -> None:
    assert httpx.get(f"{api.base}/health").status_code == 200  # open, as vllm serve's
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{api.base}/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{api.base}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"model": "M", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "M", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "M"}, 400, "prompt"),
    ({"model": "nope", "prompt": "hi"}, 404, "does not exist"),
    ({"model": "M", "prompt": "hi", "n": 9}, 400, "http.max_n"),
    ({"model": "M", "prompt": "hi", "max_tokens": 100000}, 400, "max_model_len"),
    ({"model": "M", "prompt": [[5] * 5000]}, 400, "maximum context length"),
    ({"model": "M", "prompt": [999999]}, 400, "vocabulary"),
    ({"model": "M", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"model": "M", "prompt": "hi", "presence_penalty": 5.0}, 400, "presence_penalty"),
    ({"model": "M", "prompt": "hi", "temperature": -1}, 400, "temperature"),
])
def test_bad_completions_get_vllms_errors(api: Api, body: dict[str, object], status: int,
                                          needle: str) -> None:
    if body.get("model") == "M":
        body = {**body, "model": base_model(api)}
    r = api.http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] + str(err["param"]), err
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert "Traceback" not in r.text


def test_unknown_fields_are_ignored_as_vllm_ignores_them(api: Api) -> None:
    r = api.http.post("/v1/completions", json={"model": base_model(api), "prompt": "hi",
                                               "max_tokens": 2, "bogus": 1, "store": None})
    assert r.status_code == 200, r.text


def test_malformed_and_oversized_bodies_and_unknown_routes(api: Api) -> None:
    r = api.http.post("/v1/completions", content=b"{not json",
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "json_invalid" in r.json()["error"]["message"]
    r = api.http.post("/v1/completions", content=b"x" * 300_000,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "http.max_body_bytes" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off as it passes the limit
        for _ in range(30):
            yield b"x" * 10_000

    r = api.http.post("/v1/completions", content=chunks(),
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = api.http.get("/v1/nothing")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}  # as vllm serve
    chat = api.http.post("/v1/chat/completions", json={"model": base_model(api),
                                                       "messages": []})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == 400


def test_a_client_that_vanishes_mid_stream_leaves_nothing_in_decode(api: Api) -> None:
    body = {"model": base_model(api), "prompt": "Once upon a time", "max_tokens": 1500,
            "stream": True, "ignore_eos": True}
    for _ in range(3):
        with api.http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [json.loads(x[6:]) for x in (next(lines) for _ in range(6)) if x]
            assert got and all("choices" in g for g in got)
    deadline = time.monotonic() + 20
    while api.in_flight() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert api.in_flight() == 0
    # and it still serves
    assert api.client.completions.create(model=base_model(api), prompt="hi",
                                         max_tokens=2).choices[0].text is not None


def test_500_concurrent_streams_are_served_and_leave_nothing_behind(api: Api) -> None:
    """500 streams at once (a few vanishing mid-way): each ends with [DONE] or is refused
    with an OpenAI error; afterwards no request is left in decode and the front holds no more
    sockets than before."""
    model = base_model(api)
    with ControlClient(api.daemon.cfg.control_endpoint) as c:
        pid = next(ch.pid for ch in c.status().children if ch.name == "http")
    assert pid is not None
    fds_before = len(list(Path(f"/proc/{pid}/fd").iterdir()))

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"model": model, "prompt": f"Stream {i}", "max_tokens": 4, "stream": True,
                "ignore_eos": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return f"status {r.status_code}: {(await r.aread())[:200]!r}"
            last = ""
            async for line in r.aiter_lines():
                if line:
                    last = line
                if i % 50 == 0 and line.startswith("data: {"):
                    return "vanished"  # closes the stream mid-way
            return last

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=api.base, timeout=300, limits=limits,
                                     headers={"Authorization": f"Bearer {KEY}"}) as client:
            return await asyncio.gather(*(one(client, i) for i in range(500)))

    ends = asyncio.run(run())
    assert ends.count("vanished") == 10
    assert ends.count("data: [DONE]") == 490, [e for e in ends if e != "data: [DONE]"][:5]
    deadline = time.monotonic() + 30
    while api.in_flight() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert api.in_flight() == 0
    while len(list(Path(f"/proc/{pid}/fd").iterdir())) > fds_before + 5 \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(list(Path(f"/proc/{pid}/fd").iterdir())) <= fds_before + 5
    assert api.client.completions.create(model=model, prompt="hi", max_tokens=2).choices
