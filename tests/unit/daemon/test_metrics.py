"""``Metrics`` and ``DecodeVllmMetrics``: vLLM's families as decode's engine records them, the
co-location gauges, and what an operator relies on: gauges that follow an idle decode, counters
for counts across decode restarts, job series that go and stay off an open page, no process
metrics, and one HTTP path. No daemon; a child process records as decode's vLLM does."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harli.daemon.metrics import JOB_SERIES_KEEP_S, Metrics
from harli.daemon.metrics_server import MetricsServer
from harli.ipc.finetune import MicroStepReport, ValidationScore

MODEL = {"model_name": "tiny", "engine": "0"}

# What decode's vLLM stat logger does in its process: prometheus-client in multiprocess mode,
# a gauge in vLLM's "mostrecent" mode, a counter and a histogram with vLLM's label names.
_DECODE = """
import os, sys
from prometheus_client import Counter, Gauge, Histogram
labels = ["model_name", "engine"]
Gauge("vllm:num_requests_running", "Running.", labels,
      multiprocess_mode="mostrecent").labels("tiny", "0").set(float(sys.argv[1]))
Counter("vllm:prompt_tokens", "Prompt tokens.", labels).labels("tiny", "0").inc(
    float(sys.argv[2]))
Histogram("vllm:time_to_first_token_seconds", "TTFT.", labels,
          buckets=[0.1, 1.0]).labels("tiny", "0").observe(0.5)
Counter("not_vllm_thing", "Another library's.").inc()
print(os.getpid())
"""


def decode_records(path: Path, running: int, prompt_tokens: int) -> int:
    """A process that records as decode's engine does, into ``path``; its pid."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)}
    out = subprocess.run([sys.executable, "-c", _DECODE, str(running), str(prompt_tokens)],
                         env=env, check=True, capture_output=True, text=True)
    return int(out.stdout)


@dataclass
class FakeChild:
    name: str
    restarts: int = 0
    forced_restarts: int = 0


def families(m: Metrics) -> dict[str, Any]:
    return {f.name: f for f in m.registry.collect()}


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_decodes_vllm_families_are_on_the_page_as_recorded(tmp_path: Path) -> None:
    decode_records(tmp_path, running=9, prompt_tokens=100)  # a previous daemon's decode
    m = Metrics(tmp_path)
    assert not list(tmp_path.glob("*.db"))  # a daemon starts on an empty directory
    assert "vllm:prompt_tokens" not in families(m)
    decode_records(tmp_path, running=3, prompt_tokens=7)
    fams = families(m)
    assert fams["vllm:num_requests_running"].type == "gauge"
    assert fams["vllm:prompt_tokens"].type == "counter"
    assert fams["vllm:time_to_first_token_seconds"].type == "histogram"
    assert value(m, "vllm:num_requests_running", **MODEL) == 3
    assert value(m, "vllm:prompt_tokens_total", **MODEL) == 7
    assert value(m, "vllm:time_to_first_token_seconds_bucket", le="1.0", **MODEL) == 1
    assert "not_vllm_thing" not in fams  # decode's process may hold others: not ours to serve
    names = {f.name for f in text_string_to_metric_families(m.page().text)}
    assert {"vllm:num_requests_running", "vllm:prompt_tokens"} <= names


def test_across_decode_restarts_counts_add_up_and_gauges_go_with_their_decode(
        tmp_path: Path) -> None:
    m = Metrics(tmp_path)
    decode_records(tmp_path, running=3, prompt_tokens=7)
    m.on_decode_exit()
    assert value(m, "vllm:num_requests_running", **MODEL) is None  # no engine runs now
    assert value(m, "vllm:prompt_tokens_total", **MODEL) == 7  # a counter never goes back
    decode_records(tmp_path, running=1, prompt_tokens=5)
    assert value(m, "vllm:num_requests_running", **MODEL) == 1
    assert value(m, "vllm:prompt_tokens_total", **MODEL) == 12
    assert value(m, "vllm:time_to_first_token_seconds_count", **MODEL) == 2


def test_the_page_parses_and_names_the_counters_with_total() -> None:
    m = Metrics()
    m.watch_children([FakeChild("decode")])
    m.predictor_drift.read((), lambda: 0.0)
    m.on_slo_tokens(1, 1)
    page = m.page()
    assert page.content_type == "text/plain; version=0.0.4; charset=utf-8"
    names = {s.name for f in text_string_to_metric_families(page.text) for s in f.samples}
    assert {"harli_child_restarts_total", "harli_child_forced_restarts_total",
            "harli_predictor_drift_events_total", "harli_slo_tokens_total",
            "harli_slo_tokens_within_total"} <= names


def test_a_page_without_tenant_series_names_no_job() -> None:
    m = Metrics()
    m.on_micro_step(micro_step(41, 1))
    full = m.page().text
    open_page = m.page(tenant_series=False).text
    assert 'job="41"' in full and "harli_job_loss" in full
    assert 'job="41"' not in open_page and "harli_job_" not in open_page
    assert "harli_finetune_tokens_total" in open_page  # the service's own counts stay


def test_no_process_or_platform_metrics() -> None:
    names = [f.name for f in Metrics().registry.collect()]
    assert not [n for n in names if n.startswith(("process_", "python_", "platform_"))]


def test_token_latency_gauges_and_headroom_then_nan_when_idle() -> None:
    m = Metrics()
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
    m = Metrics()
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
    m = Metrics()
    child = FakeChild("decode")
    m.watch_children([child])
    assert families(m)["harli_child_restarts"].type == "counter"
    child.restarts, child.forced_restarts = 3, 1
    assert value(m, "harli_child_restarts_total", child="decode") == 3
    assert value(m, "harli_child_forced_restarts_total", child="decode") == 1


def test_drift_events_are_a_counter() -> None:
    m = Metrics()
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
    m = Metrics()
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
    m = Metrics()
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
    assert status == 200 and b"harli_decode_iterations_total" in body
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
