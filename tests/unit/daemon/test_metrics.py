"""``Metrics`` and ``VllmMetrics``: vLLM's metric contract (names, types, labels, buckets), the
co-location gauges, and what an operator relies on: gauges that follow an idle decode, counters
for counts, job series that go, no process metrics, and one HTTP path. No daemon, no process."""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harli.daemon.metrics import JOB_SERIES_KEEP_S, Metrics
from harli.daemon.metrics_server import MetricsServer
from harli.daemon.vllm_metrics import (
    INTER_TOKEN_LATENCY_BUCKETS_S,
    REQUEST_LATENCY_BUCKETS_S,
    TIME_TO_FIRST_TOKEN_BUCKETS_S,
    finished_reason,
)
from harli.ipc.decode import IterationTelemetry
from harli.ipc.finetune import MicroStepReport, ValidationScore

MODEL = {"model_name": "tiny", "engine": "0"}

# vLLM 0.32's PrometheusStatLogger: family name (as prometheus-client reports it, without
# _total) -> (type, label names).
VLLM_CONTRACT = {
    "vllm:num_requests_running": ("gauge", {"model_name", "engine"}),
    "vllm:num_requests_waiting": ("gauge", {"model_name", "engine"}),
    "vllm:kv_cache_usage_perc": ("gauge", {"model_name", "engine"}),
    "vllm:lora_requests_info": ("gauge", {"max_lora", "waiting_lora_adapters",
                                          "running_lora_adapters"}),
    "vllm:num_preemptions": ("counter", {"model_name", "engine"}),
    "vllm:prompt_tokens": ("counter", {"model_name", "engine"}),
    "vllm:generation_tokens": ("counter", {"model_name", "engine"}),
    "vllm:request_success": ("counter", {"model_name", "engine", "finished_reason"}),
    "vllm:time_to_first_token_seconds": ("histogram", {"model_name", "engine"}),
    "vllm:inter_token_latency_seconds": ("histogram", {"model_name", "engine"}),
    "vllm:e2e_request_latency_seconds": ("histogram", {"model_name", "engine"}),
    "vllm:request_queue_time_seconds": ("histogram", {"model_name", "engine"}),
}


@dataclass
class FakeChild:
    name: str
    restarts: int = 0
    forced_restarts: int = 0


def telemetry(**kw: Any) -> IterationTelemetry:
    fields: dict[str, Any] = {
        "incarnation": 1, "iteration": 1, "start_s": 10.0, "end_s": 10.01, "num_running": 3,
        "num_waiting": 2, "decode_tokens": 3, "prefill_tokens": 0, "context_tokens": 30,
        "kv_blocks_total": 101, "kv_blocks_free": 60, "kv_blocks_lent": 20}
    fields.update(kw)
    return IterationTelemetry(**fields)


def families(m: Metrics) -> dict[str, Any]:
    return {f.name: f for f in m.registry.collect()}


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_the_vllm_contract_is_there_with_vllms_types_and_label_names() -> None:
    fams = families(Metrics("tiny", max_loras=4))
    for name, (kind, labels) in VLLM_CONTRACT.items():
        assert name in fams, name
        assert fams[name].type == kind, name
        sample_labels = {k for s in fams[name].samples for k in s.labels} - {"le"}
        assert sample_labels == labels, name


def test_the_histograms_have_vllms_buckets() -> None:
    fams = families(Metrics("tiny"))

    def bounds(name: str) -> tuple[float, ...]:
        return tuple(float(s.labels["le"]) for s in fams[name].samples
                     if s.name.endswith("_bucket") and s.labels["le"] != "+Inf")

    assert bounds("vllm:time_to_first_token_seconds") == TIME_TO_FIRST_TOKEN_BUCKETS_S
    assert bounds("vllm:inter_token_latency_seconds") == INTER_TOKEN_LATENCY_BUCKETS_S
    assert bounds("vllm:e2e_request_latency_seconds") == REQUEST_LATENCY_BUCKETS_S
    assert bounds("vllm:request_queue_time_seconds") == REQUEST_LATENCY_BUCKETS_S


def test_the_page_parses_and_names_the_counters_with_total() -> None:
    m = Metrics("tiny", max_loras=4)
    m.watch_children([FakeChild("decode")])
    m.predictor_drift.read((), lambda: 0.0)
    m.on_slo_tokens(1, 1)
    page = m.page()
    assert page.content_type == "text/plain; version=0.0.4; charset=utf-8"
    names = {s.name for f in text_string_to_metric_families(page.text) for s in f.samples}
    assert {"vllm:num_preemptions_total", "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total", "vllm:request_success_total",
            "harli_child_restarts_total", "harli_child_forced_restarts_total",
            "harli_predictor_drift_events_total", "harli_slo_tokens_total",
            "harli_slo_tokens_within_total"} <= names


def test_no_lora_info_with_lora_off() -> None:
    assert "vllm:lora_requests_info" not in families(Metrics("tiny", max_loras=None))


def test_no_process_or_platform_metrics() -> None:
    names = [f.name for f in Metrics("tiny", max_loras=4).registry.collect()]
    assert not [n for n in names if n.startswith(("process_", "python_", "platform_"))]


def test_an_iteration_sets_the_engine_gauges_and_idle_resets_them() -> None:
    m = Metrics("tiny", max_loras=4)
    m.on_iteration(telemetry(preempted=2))
    assert value(m, "vllm:num_requests_running", **MODEL) == 3
    assert value(m, "vllm:num_requests_waiting", **MODEL) == 2
    # 100 usable blocks (vLLM's null block apart), 60 free, 20 lent: 20 held by requests.
    assert value(m, "vllm:kv_cache_usage_perc", **MODEL) == pytest.approx(0.2)
    assert value(m, "vllm:num_preemptions_total", **MODEL) == 2
    m.on_idle()
    assert value(m, "vllm:num_requests_running", **MODEL) == 0
    assert value(m, "vllm:num_requests_waiting", **MODEL) == 0
    assert value(m, "vllm:kv_cache_usage_perc", **MODEL) == 0
    assert value(m, "vllm:num_preemptions_total", **MODEL) == 2  # a counter stays


def test_requests_waiting_for_a_restarting_decode_count_as_waiting() -> None:
    m = Metrics("tiny")
    m.on_iteration(telemetry())
    m.on_idle(waiting=5)
    assert value(m, "vllm:num_requests_running", **MODEL) == 0
    assert value(m, "vllm:num_requests_waiting", **MODEL) == 5
    m.on_iteration(telemetry(num_running=1, num_waiting=0))
    assert value(m, "vllm:num_requests_running", **MODEL) == 1


def lora_series(m: Metrics) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for s in families(m)["vllm:lora_requests_info"].samples]


def test_lora_info_names_the_adapters_running_and_waiting_in_one_series() -> None:
    m = Metrics("tiny", max_loras=4)
    m.on_iteration(telemetry(running_lora_adapters=["a", "b"], waiting_lora_adapters=["c"]))
    ((labels, stamp),) = lora_series(m)
    assert labels == {"max_lora": "4", "running_lora_adapters": "a,b",
                      "waiting_lora_adapters": "c"}
    assert stamp > 1e9  # a unix time, as vLLM sets it: the router takes the latest series
    m.on_iteration(telemetry(running_lora_adapters=["c"]))
    ((labels, _),) = lora_series(m)  # the old combination is gone
    assert labels["running_lora_adapters"] == "c" and labels["waiting_lora_adapters"] == ""
    m.on_idle()
    ((labels, _),) = lora_series(m)
    assert labels["running_lora_adapters"] == labels["waiting_lora_adapters"] == ""


def test_vllm_request_metrics() -> None:
    m = Metrics("tiny")
    v = m.vllm
    v.on_first_token(0.05, prompt_tokens=7)
    v.on_token_gap(0.02)
    v.on_generated(3)
    v.on_finished("length", e2e_s=0.4, queue_s=0.01)
    v.on_finished("shutdown", e2e_s=0.5, queue_s=None)  # the daemon's own end: an abort
    assert value(m, "vllm:prompt_tokens_total", **MODEL) == 7
    assert value(m, "vllm:generation_tokens_total", **MODEL) == 3
    assert value(m, "vllm:time_to_first_token_seconds_count", **MODEL) == 1
    assert value(m, "vllm:inter_token_latency_seconds_sum", **MODEL) == pytest.approx(0.02)
    assert value(m, "vllm:request_success_total", finished_reason="length", **MODEL) == 1
    assert value(m, "vllm:request_success_total", finished_reason="abort", **MODEL) == 1
    assert value(m, "vllm:request_success_total", finished_reason="stop", **MODEL) == 0
    assert value(m, "vllm:e2e_request_latency_seconds_count", **MODEL) == 2
    assert value(m, "vllm:request_queue_time_seconds_count", **MODEL) == 1  # never scheduled


@pytest.mark.parametrize(("reason", "vllm"), [
    ("stop", "stop"), ("length", "length"), ("abort", "abort"), ("error", "error"),
    ("shutdown", "abort"), ("adapter_removed", "abort")])
def test_finished_reasons_are_vllms(reason: str, vllm: str) -> None:
    assert finished_reason(reason) == vllm


def test_token_latency_gauges_and_headroom_then_nan_when_idle() -> None:
    m = Metrics("tiny")
    assert math.isnan(value(m, "harli_tpot_measured_seconds") or 0.0)
    m.on_token_latency(0.012, predicted_s=0.015, slo_s=0.02)
    assert value(m, "harli_tpot_measured_seconds") == 0.012
    assert value(m, "harli_tpot_predicted_seconds") == 0.015
    assert value(m, "harli_tpot_slo_headroom_seconds") == pytest.approx(0.008)
    m.on_token_latency(0.025, predicted_s=None, slo_s=0.02)
    assert value(m, "harli_tpot_slo_headroom_seconds") == pytest.approx(-0.005)
    assert math.isnan(value(m, "harli_tpot_predicted_seconds") or 0.0)
    m.on_idle()
    for name in ("harli_tpot_measured_seconds", "harli_tpot_predicted_seconds",
                 "harli_tpot_slo_headroom_seconds"):
        assert math.isnan(value(m, name) or 0.0), name


def test_slo_attainment_is_two_counters_of_each_kind() -> None:
    m = Metrics("tiny")
    m.on_slo_tokens(10, 9)
    m.on_slo_tokens(5, 5)
    m.on_slo_request(within=True)
    m.on_slo_request(within=False)
    assert value(m, "harli_slo_tokens_total") == 15
    assert value(m, "harli_slo_tokens_within_total") == 14
    assert value(m, "harli_slo_requests_total") == 2
    assert value(m, "harli_slo_requests_within_total") == 1
    assert "harli_slo_attainment" not in families(m)


def test_restarts_are_counters_read_at_scrape_time() -> None:
    m = Metrics("tiny")
    child = FakeChild("decode")
    m.watch_children([child])
    assert families(m)["harli_child_restarts"].type == "counter"
    child.restarts, child.forced_restarts = 3, 1
    assert value(m, "harli_child_restarts_total", child="decode") == 3
    assert value(m, "harli_child_forced_restarts_total", child="decode") == 1


def test_drift_events_are_a_counter() -> None:
    m = Metrics("tiny")
    events = [0]
    m.predictor_drift.read((), lambda: float(events[0]))
    events[0] = 2
    assert families(m)["harli_predictor_drift_events"].type == "counter"
    assert value(m, "harli_predictor_drift_events_total") == 2


def micro_step(job_id: int, step: int) -> MicroStepReport:
    return MicroStepReport(job_id=job_id, micro_step=step, step=step, epoch=0, tokens=64 * step,
                           step_tokens=64, duration_s=0.1, level=2, loss=1.5, paused_s=0.5,
                           total_steps=9)


def job_series(m: Metrics, job: str) -> list[str]:
    return sorted({s.name for f in m.registry.collect() for s in f.samples
                   if s.labels.get("job") == job})


def test_a_jobs_series_go_a_while_after_it_ends() -> None:
    m = Metrics("tiny")
    m.on_micro_step(micro_step(1, 5))
    m.on_validation(1, ValidationScore(loss=1.2, accuracy=0.5, examples=3, tokens=30,
                                       duration_s=0.1))
    m.on_micro_step(micro_step(2, 1))
    assert len(job_series(m, "1")) == 8  # the paused counter has its _created too
    m.on_job_ended(1, now=100.0)
    m.tick(100.0 + JOB_SERIES_KEEP_S - 1)
    assert value(m, "harli_job_steps", job="1") == 5  # scrapes still see its final values
    m.tick(100.0 + JOB_SERIES_KEEP_S)
    assert job_series(m, "1") == []
    assert value(m, "harli_job_steps", job="2") == 1  # another job's stay
    m.on_job_ended(3, now=0.0)  # a job that never ran (cancelled while queued)
    m.tick(JOB_SERIES_KEEP_S)


# -- the HTTP endpoint -------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[str]:
    m = Metrics("tiny")
    s = MetricsServer(m.registry, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{s.port}"
    finally:
        s.close()


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method),
                                    timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_metrics_are_on_metrics_only(server: str) -> None:
    status, headers, body = fetch(server + "/metrics")
    assert status == 200 and b"vllm:num_requests_running" in body
    assert headers["Content-Type"].startswith("text/plain")
    for path in ("/", "/health", "/metrics/x", "/v1/models"):
        status, _, body = fetch(server + path)
        assert status == 404 and body == b"not found: the metrics are at /metrics\n", path


def test_head_answers_like_get_without_a_body(server: str) -> None:
    _, _, page = fetch(server + "/metrics")
    status, headers, body = fetch(server + "/metrics", "HEAD")
    assert status == 200 and body == b""
    assert int(headers["Content-Length"]) == pytest.approx(len(page), rel=0.2)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_refused(server: str, method: str) -> None:
    status, headers, _ = fetch(server + "/metrics", method)
    assert status == 405 and headers["Allow"] == "GET, HEAD"
