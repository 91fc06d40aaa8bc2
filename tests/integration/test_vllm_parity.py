"""Harli's HTTP API against ``vllm serve`` itself: the same tiny model, the same adapter, the
same request bodies sent to both, the answers compared whole (ids, timestamps and the
configuration fingerprint aside).

Every field of vLLM's completion and chat requests that changes an answer on this model is
sent at a non-default value, one at a time, plus errors, streams, ``n`` > 1, logprobs,
structured outputs, tools, the adapter, and tokenize / detokenize; and the Responses API
(``/v1/responses``: its inputs, sampling, text formats, the adapter, its event stream, errors
and retrieval). Accepted differences, each with its reason, are in ``DIFFERENCES``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harli.bench.http_serving import vllm_serving, wait_http
from harli.bench.local_daemon import LocalDaemon
from harli.bench.lora import make_adapter

from .conftest import free_port, make_daemon

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

ADAPTER = "digits"
# Keys whose values are per response (ids, clocks) or per server configuration.
# ``item_id``: a Responses stream's events name their output item (msg_...) by it.
VOLATILE = {"id", "created", "system_fingerprint", "created_at", "item_id"}

# Where Harli answers differently on purpose; the reason is the value.
DIFFERENCES = {
    "prompt_logprobs": "vLLM 0.32's CPU LoRA logits path fails on prompt positions: with LoRA "
                       "serving on, vllm serve's engine dies on such a request and every "
                       "later request fails; Harli refuses it (400) and serves on",
}


class Servers:
    def __init__(self, harli: str, vllm: str, base_model: str) -> None:
        self.base = {"harli": harli, "vllm": vllm}
        self.model = base_model
        self.http = httpx.Client(timeout=120)

    def both(self, method: str, path: str, body: dict[str, Any] | None = None
             ) -> dict[str, httpx.Response]:
        return {name: self.http.request(method, base + path, json=body)
                for name, base in self.base.items()}

    def stream(self, path: str, body: dict[str, Any]) -> dict[str, list[Any]]:
        out = {}
        for name, base in self.base.items():
            with self.http.stream("POST", base + path, json=body) as r:
                assert r.status_code == 200, (name, r.read())
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", (name, events[-3:])
            out[name] = [normalize(json.loads(e)) for e in events[:-1]]
        return out

    def events(self, path: str, body: dict[str, Any]) -> dict[str, list[Any]]:
        """A Responses stream's events (``event: TYPE`` then ``data: JSON``; no ``[DONE]``),
        each its type and its data normalized."""
        out = {}
        for name, base in self.base.items():
            with self.http.stream("POST", base + path, json=body) as r:
                assert r.status_code == 200, (name, r.read())
                lines = [line for line in r.iter_lines() if line]
            events = []
            for kind, data in zip(lines[::2], lines[1::2], strict=True):
                assert kind.startswith("event: ") and data.startswith("data: "), (kind, data)
                event = json.loads(data[6:])
                assert event["type"] == kind[7:], (name, kind, event)
                events.append(normalize(event))
            out[name] = _merge_deltas(events)
        return out


def _merge_deltas(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Responses stream with each run of ``*.delta`` events of one content part as one
    event, numbered again. How a completion's tokens split into deltas is timing in vllm
    serve: its ``AsyncLLM`` merges the engine's outputs that reach the front while its serving
    layer is still busy with an earlier one (``RequestOutputCollector``), which the event
    builder of the Responses API, slower than chat's, makes likely on a loaded machine; the
    text, the logprobs and every other event must be the same."""
    out: list[dict[str, Any]] = []
    for event in events:
        last = out[-1] if out else None
        if (last is not None and event["type"].endswith(".delta")
                and event["type"] == last["type"]
                and all(event.get(k) == last.get(k) for k in ("output_index", "content_index"))):
            merged = {**last, "delta": last["delta"] + event["delta"]}
            if "logprobs" in event:
                merged["logprobs"] = (last.get("logprobs") or []) + (event["logprobs"] or [])
            out[-1] = merged
        else:
            out.append(event)
    return [{**e, "sequence_number": i} for i, e in enumerate(out)]


def normalize(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def assert_same(ours: Any, theirs: Any, where: str = "$") -> None:
    """Equal after ``normalize``; log-probabilities within 1e-4 (two engines batch their
    requests differently, and float sums differ in the last bits)."""
    ours, theirs = normalize(ours), normalize(theirs)
    _same(ours, theirs, where)


def _same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-4), f"{where}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Servers]:
    base = tmp_path_factory.mktemp("parity")
    adapter = make_adapter(tiny_model, base / "adapter", seed=11)
    port, vport = free_port(), free_port()
    daemon: LocalDaemon = make_daemon(base / "d", tiny_model, f"http.port={port}",
                                      'scheduler.policy="decode-only"')
    log = base / "vllm.log"
    # Both start at once: vllm serve's start is the longer.
    with vllm_serving(daemon.cfg, vport, log, "--lora-modules",
                      f"{ADAPTER}={adapter}") as vllm, daemon:
        harli, vbase = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{vport}"
        wait_http(harli, None, daemon.log_path)
        wait_http(vbase, vllm, log)
        ok = httpx.post(f"{harli}/v1/load_lora_adapter",
                        json={"lora_name": ADAPTER, "lora_path": str(adapter)})
        assert ok.status_code == 200, ok.text
        yield Servers(harli, vbase, tiny_model.name)


PROMPT = "The river ran past the old mill and"
MESSAGES = [{"role": "system", "content": "You count."},
            {"role": "user", "content": "one two three"}]

# One field at a non-default value each (greedy unless the field is about sampling).
COMPLETION_CASES: list[dict[str, Any]] = [
    {},
    {"echo": True},
    {"logprobs": 3},
    {"n": 3, "temperature": 1.0, "seed": 5},
    {"temperature": 0.9, "seed": 7},
    {"top_p": 0.5, "temperature": 1.0, "seed": 7},
    {"top_k": 5, "temperature": 1.0, "seed": 7},
    {"min_p": 0.2, "temperature": 1.0, "seed": 7},
    {"presence_penalty": 1.5},
    {"frequency_penalty": 1.5},
    {"repetition_penalty": 1.4},
    {"logit_bias": {"100": 10}},
    {"stop": ["e"]},
    {"stop": ["e"], "include_stop_str_in_output": True},
    {"stop_token_ids": [100]},
    {"ignore_eos": True, "max_tokens": 20},
    {"min_tokens": 6},
    {"skip_special_tokens": False},
    {"spaces_between_special_tokens": False},
    {"allowed_token_ids": [100, 101, 102, 103]},
    {"bad_words": ["the"]},
    {"truncate_prompt_tokens": 3},
    {"return_token_ids": True},
    {"add_special_tokens": False},
    {"suffix": None, "user": "someone", "priority": 0, "cache_salt": "s1"},
    {"structured_outputs": {"choice": ["yes", "no"]}},
    {"structured_outputs": {"regex": "[0-9]{3}"}},
    {"response_format": {"type": "json_object"}, "max_tokens": 24},
    {"prompt": [[5, 6, 7, 8], [9, 10]]},
    {"model": ADAPTER},
    {"model": ADAPTER, "logprobs": 2, "n": 2, "temperature": 1.0, "seed": 3},
]

CHAT_CASES: list[dict[str, Any]] = [
    {},
    {"messages": [{"role": "developer", "content": "You count."},
                  {"role": "user", "content": "one two"}]},
    {"logprobs": True, "top_logprobs": 2},
    {"n": 2, "temperature": 1.0, "seed": 9},
    {"max_completion_tokens": 5},
    {"presence_penalty": 1.0, "frequency_penalty": 0.5},
    {"stop": ["o"]},
    {"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                "required": ["n"]}}}, "max_completion_tokens": 24},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {}}}}], "tool_choice": "none"},
    {"add_generation_prompt": False},
    {"messages": [{"role": "user", "content": "one two"},
                  {"role": "assistant", "content": "three"}],
     "continue_final_message": True, "add_generation_prompt": False},
    {"reasoning_effort": "low", "store": False, "metadata": {"k": "v"}},
    {"model": ADAPTER},
]

ERROR_CASES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"model": "nope", "prompt": "hi"}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100000}),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}),
    ("/v1/completions", {"prompt": [999999]}),
    ("/v1/completions", {"prompt": "hi", "n": 2, "temperature": 0.0}),
    ("/v1/chat/completions", {"messages": []}),
    # Not errors in vLLM: an unknown role is rendered, a numeric string is a number.
    ("/v1/chat/completions", {"messages": [{"role": "nobody", "content": "x"}],
                              "seed": 1, "max_tokens": 4}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5", "seed": 1}),
]


INPUT = [{"role": "user", "content": "one two three"}]
JSON_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}

RESPONSES_CASES: list[dict[str, Any]] = [
    {},
    {"input": INPUT, "instructions": "You count."},
    {"input": [{"role": "developer", "content": "You count."},
               {"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "one two"}]}]},
    {"max_output_tokens": 4},
    {"temperature": 0.9, "seed": 7},
    {"top_p": 0.5, "temperature": 1.0, "seed": 7},
    {"include": ["message.output_text.logprobs"], "top_logprobs": 2},
    {"text": {"format": {"type": "json_schema", "name": "n", "schema": JSON_SCHEMA}},
     "max_output_tokens": 24},
    {"text": {"format": {"type": "json_object"}}, "max_output_tokens": 24},
    {"top_k": 5, "temperature": 1.0, "seed": 2},
    {"repetition_penalty": 1.4},
    {"stop": ["e"]},
    {"structured_outputs": {"choice": ["yes", "no"]}},
    {"input": [{"type": "message", "role": "user", "content": "one"},
               {"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "two", "annotations": []}]},
               {"role": "user", "content": "three"}]},
    {"tools": [{"type": "function", "name": "f", "parameters": {
        "type": "object", "properties": {}}}], "tool_choice": "none"},
    {"reasoning": {"effort": "low"}, "enable_response_messages": True},
    {"model": ADAPTER},
    {"model": ADAPTER, "include": ["message.output_text.logprobs"], "top_logprobs": 2},
    {"store": False, "metadata": {"k": "v"}, "user": "someone"},
]

RESPONSES_ERROR_CASES: list[dict[str, Any]] = [
    {"model": "nope"},
    {"max_output_tokens": "many"},
    {"temperature": -1},
    {"max_output_tokens": 100000},
    {"include": ["message.output_text.logprobs"], "top_logprobs": 50},
    {"input": []},
    {"previous_response_id": "resp_nothing"},
    {"store": True, "background": True},
]


def _ids(name: str, i: int, case: dict[str, Any]) -> str:
    return f"{name}-{i}-" + ",".join(sorted(case)) if case else f"{name}-{i}-plain"


@pytest.mark.parametrize("case", COMPLETION_CASES,
                         ids=[_ids("cmpl", i, c) for i, c in enumerate(COMPLETION_CASES)])
def test_completions_equal(servers: Servers, case: dict[str, Any]) -> None:
    body = {"model": servers.model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.0,
            **case}
    got = servers.both("POST", "/v1/completions", body)
    assert got["harli"].status_code == got["vllm"].status_code, \
        {k: r.text[:400] for k, r in got.items()}
    assert_same(got["harli"].json(), got["vllm"].json())


@pytest.mark.parametrize("case", CHAT_CASES,
                         ids=[_ids("chat", i, c) for i, c in enumerate(CHAT_CASES)])
def test_chat_completions_equal(servers: Servers, case: dict[str, Any]) -> None:
    body = {"model": servers.model, "messages": MESSAGES, "max_tokens": 10,
            "temperature": 0.0, **case}
    if "max_completion_tokens" in case:
        body.pop("max_tokens")
    got = servers.both("POST", "/v1/chat/completions", body)
    assert got["harli"].status_code == got["vllm"].status_code, \
        {k: r.text[:400] for k, r in got.items()}
    assert_same(got["harli"].json(), got["vllm"].json())


@pytest.mark.parametrize(("path", "case"), ERROR_CASES,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{i}" for i, (p, _) in
                              enumerate(ERROR_CASES)])
def test_errors_equal(servers: Servers, path: str, case: dict[str, Any]) -> None:
    body = {"model": servers.model, **case}
    got = servers.both("POST", path, body)
    assert got["harli"].status_code == got["vllm"].status_code, \
        {k: r.text[:400] for k, r in got.items()}
    assert_same(got["harli"].json(), got["vllm"].json())


def test_streams_equal_chunk_for_chunk(servers: Servers) -> None:
    for path, body in (
            ("/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.0,
                                 "stream": True, "ignore_eos": True,
                                 "stream_options": {"include_usage": True,
                                                    "continuous_usage_stats": True}}),
            ("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "n": 2, "seed": 1,
                                 "temperature": 1.0, "stream": True, "logprobs": 1}),
            ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8,
                                      "temperature": 0.0, "stream": True,
                                      "stream_options": {"include_usage": True}})):
        got = servers.stream(path, {"model": servers.model, **body})
        if body.get("n", 1) > 1:
            # How the completions of one request interleave is timing in vllm serve (its
            # front adds them to the engine core one message at a time, so one may start an
            # iteration later); each completion's own chunks must be the same.
            got = {k: sorted(v, key=_choice_index) for k, v in got.items()}
        assert_same(got["harli"], got["vllm"], path)


def _choice_index(event: dict[str, Any]) -> float:
    choices = event.get("choices") or []
    return float(choices[0]["index"]) if choices else math.inf


def test_tokenize_detokenize_and_models_equal(servers: Servers) -> None:
    for path, body in (("/tokenize", {"model": servers.model, "prompt": PROMPT}),
                       ("/tokenize", {"model": servers.model, "messages": MESSAGES}),
                       ("/detokenize", {"model": servers.model, "tokens": [5, 6, 7, 8]})):
        got = servers.both("POST", path, body)
        assert got["harli"].status_code == got["vllm"].status_code == 200
        assert got["harli"].json() == got["vllm"].json(), path
    models = servers.both("GET", "/v1/models")
    ids = {k: sorted(m["id"] for m in r.json()["data"]) for k, r in models.items()}
    assert ids["harli"] == ids["vllm"] == sorted([servers.model, ADAPTER])
    for path in ("/health", "/ping", "/version", "/load"):
        got = servers.both("GET", path)
        assert got["harli"].status_code == got["vllm"].status_code == 200, path


def test_prompt_logprobs_are_refused_where_vllm_serve_would_die(servers: Servers) -> None:
    """The one difference (``DIFFERENCES``): not sent to vllm serve, whose engine it ends."""
    r = servers.http.post(servers.base["harli"] + "/v1/completions", json={
        "model": servers.model, "prompt": PROMPT, "max_tokens": 2, "echo": True,
        "logprobs": 1})
    assert r.status_code == 400 and "prompt_logprobs" in r.json()["error"]["message"]
    assert servers.both("POST", "/v1/completions", {"model": servers.model, "prompt": "hi",
                                                    "max_tokens": 2})["harli"].status_code == 200


@pytest.mark.parametrize("case", RESPONSES_CASES,
                         ids=[_ids("resp", i, c) for i, c in enumerate(RESPONSES_CASES)])
def test_responses_equal(servers: Servers, case: dict[str, Any]) -> None:
    body = {"model": servers.model, "input": PROMPT, "max_output_tokens": 10,
            "temperature": 0.0, **case}
    got = servers.both("POST", "/v1/responses", body)
    assert got["harli"].status_code == got["vllm"].status_code == 200, \
        {k: r.text[:400] for k, r in got.items()}
    assert_same(got["harli"].json(), got["vllm"].json())


@pytest.mark.parametrize("case", RESPONSES_ERROR_CASES,
                         ids=[_ids("resp-error", i, c)
                              for i, c in enumerate(RESPONSES_ERROR_CASES)])
def test_responses_errors_equal(servers: Servers, case: dict[str, Any]) -> None:
    body = {"model": servers.model, "input": PROMPT, "max_output_tokens": 4, **case}
    got = servers.both("POST", "/v1/responses", body)
    assert got["harli"].status_code == got["vllm"].status_code != 200, \
        {k: r.text[:400] for k, r in got.items()}
    assert_same(got["harli"].json(), got["vllm"].json())


def test_responses_streams_equal_event_for_event(servers: Servers) -> None:
    for body in ({"input": MESSAGES[1:], "instructions": "You count.", "max_output_tokens": 8,
                  "temperature": 0.0},
                 {"input": PROMPT, "max_output_tokens": 6, "temperature": 1.0, "seed": 3,
                  "model": ADAPTER, "include": ["message.output_text.logprobs"],
                  "top_logprobs": 1}):
        got = servers.events("/v1/responses", {"model": servers.model, "stream": True, **body})
        assert got["harli"][-1]["type"] == "response.completed", got["harli"][-1]
        assert_same(got["harli"], got["vllm"])


def test_responses_retrieve_equal(servers: Servers) -> None:
    """vLLM stores no response unless VLLM_ENABLE_RESPONSES_API_STORE is set (neither server
    sets it): ``store`` (true by default) is ignored, and retrieving the response it made is
    the same 404 in both."""
    made = servers.both("POST", "/v1/responses", {"model": servers.model, "input": PROMPT,
                                                  "max_output_tokens": 2})
    got = {}
    for name, r in made.items():
        assert r.status_code == 200, (name, r.text)
        rid = r.json()["id"]
        assert rid.startswith("resp_"), rid
        again = servers.http.get(f"{servers.base[name]}/v1/responses/{rid}")
        got[name] = (again.status_code, json.loads(again.text.replace(rid, "RID")))
    assert got["harli"][0] == got["vllm"][0] == 404, got
    assert_same(got["harli"][1], got["vllm"][1])
    for path in ("/v1/responses/resp_nothing", "/v1/responses/resp_nothing/cancel"):
        method = "POST" if path.endswith("cancel") else "GET"
        pair = servers.both(method, path)
        assert pair["harli"].status_code == pair["vllm"].status_code, \
            {k: r.text[:400] for k, r in pair.items()}
        assert_same(pair["harli"].json(), pair["vllm"].json())


def test_responses_cached_tokens_equal(servers: Servers) -> None:
    """The Responses API reports the prompt's prefix cache use (``usage.input_tokens_details``:
    ``cache_write_tokens``, the prompt's whole KV blocks computed and written, 128 tokens each
    on CPU; ``cached_tokens``, those found): a prompt past one block, sent twice, writes its
    blocks then reads them, in both alike."""
    body = {"model": servers.model, "input": " ".join([PROMPT] * 24), "max_output_tokens": 2,
            "temperature": 0.0}
    for _ in range(2):
        got = servers.both("POST", "/v1/responses", body)
        assert got["harli"].status_code == got["vllm"].status_code == 200, \
            {k: r.text[:400] for k, r in got.items()}
        assert_same(got["harli"].json(), got["vllm"].json())
        details = got["vllm"].json()["usage"]["input_tokens_details"]
        assert details["cache_write_tokens"] + details["cached_tokens"] > 0, details
    assert details["cached_tokens"] > 0, details


def _metric_families(text: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)
            if f.name.startswith("vllm:") and not f.name.endswith("_created")}


def test_every_vllm_metric_family_is_on_both_with_vllms_shape(servers: Servers) -> None:
    """Every ``vllm:`` family vllm serve exports is on Harli's ``/metrics`` with the same
    type, help, label names and bucket bounds, and the counters of requests served moved on
    both. (``*_created`` samples are prometheus-client's creation times, absent in its
    multiprocess mode, which Harli's decode records in; Prometheus ignores them by
    default.)"""
    served = servers.both("POST", "/v1/completions", {"model": ADAPTER, "prompt": PROMPT,
                                                      "max_tokens": 3})
    assert [r.status_code for r in served.values()] == [200, 200]
    pages = {k: _metric_families(r.text) for k, r in servers.both("GET", "/metrics").items()}
    ours, theirs = pages["harli"], pages["vllm"]
    assert len(theirs) >= 30, sorted(theirs)
    assert sorted(ours) == sorted(theirs)
    for name, family in theirs.items():
        mine = ours[name]
        assert (mine.type, mine.documentation) == (family.type, family.documentation), name
        assert ({k for s in mine.samples for k in s.labels}
                == {k for s in family.samples for k in s.labels}), name
        assert ({s.labels.get("le") for s in mine.samples}
                == {s.labels.get("le") for s in family.samples}), name
    for name in ("vllm:request_success", "vllm:prompt_tokens", "vllm:generation_tokens"):
        for side in (ours, theirs):
            assert sum(s.value for s in side[name].samples) > 0, name
