"""Prometheus metrics of the daemon: vLLM's own families as decode's engine records them
(``DecodeVllmMetrics``) beside Harli's own (decode iterations, requests, children, finetune
jobs, the co-location). It is served over HTTP on ``metrics.addr``:``metrics.port`` (default
127.0.0.1:9464; port 0: none; ``MetricsServer``) and over the control API (``GetMetrics``,
``page()``), which the HTTP API's ``/metrics`` serves.

The registries are the daemon's own, so they hold no ``process_*``, ``python_*`` or platform
collectors (prometheus-client puts those in its global registry only): on a co-location host
they would describe the daemon alone, not the processes that use the machine.

Counts are counters and times and sizes are in seconds and bytes, so that a rate or a ratio
can be taken over any window; a job's series are removed a while after it ends
(``JOB_SERIES_KEEP_S``), so a daemon that runs many jobs does not accumulate them.

A job's series name its id, token counts and losses: they are the tenants' (``tenants``), and
a page asked for without them (the HTTP API's ``/metrics`` without an API key) leaves them
out. The operator's endpoint has no authentication and serves all, so it binds loopback by
default and ``serve`` warns when told to bind anything else."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric

from harli.daemon.metrics_server import MetricsServer
from harli.daemon.vllm_metrics import DecodeVllmMetrics
from harli.ipc.control import MetricsPage
from harli.ipc.decode import IterationTelemetry
from harli.ipc.finetune import MicroStepReport, ValidationScore

logger = logging.getLogger(__name__)

_ITERATION_BUCKETS_S = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05,
                        0.075, 0.1, 0.2, 0.5, 1.0)
# A job's series stay this long after it ends: two scrapes at Prometheus' default interval
# (1 min) see its final values, then they go.
JOB_SERIES_KEEP_S = 120.0


class RestartCounts(Protocol):
    """What the restart counters read of a supervised child (``Child``)."""

    name: str
    restarts: int
    forced_restarts: int


class ReadCounter:
    """A counter whose count is kept elsewhere (a child's restarts, the predictor's drift
    events), read at scrape time: a custom collector that yields it as a counter, so that
    ``rate()`` and ``increase()`` apply, instead of a gauge set from the loop."""

    def __init__(self, registry: CollectorRegistry, name: str, documentation: str,
                 labelnames: tuple[str, ...] = ()) -> None:
        self.name = name  # without "_total", which the family adds
        self.documentation = documentation
        self.labelnames = labelnames
        self._readers: list[tuple[tuple[str, ...], Callable[[], float]]] = []
        registry.register(self)

    def read(self, labelvalues: tuple[str, ...], reader: Callable[[], float]) -> None:
        self._readers.append((labelvalues, reader))

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, reader in self._readers:
            family.add_metric(values, reader())
        yield family


class RegistryView:
    """Another registry's metrics, collected as part of this one."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


class Metrics:
    def __init__(self, vllm_metrics_dir: Path | None = None) -> None:
        """``vllm_metrics_dir``: where decode's engine records vLLM's metrics (None: a
        daemon without decode metrics, in tests)."""
        # The service's series (``service``: vLLM's and the co-location's) and the tenants'
        # (``tenants``: a job's id, tokens and losses), which an open /metrics leaves out;
        # ``registry`` holds both, for the operator's endpoint.
        self.service = CollectorRegistry()
        self.tenants = CollectorRegistry()
        self.registry = CollectorRegistry()
        self.registry.register(RegistryView(self.service))
        self.registry.register(RegistryView(self.tenants))
        self.vllm: DecodeVllmMetrics | None = None
        if vllm_metrics_dir is not None:
            self.vllm = DecodeVllmMetrics(vllm_metrics_dir)
            self.vllm.reset()
            self.service.register(self.vllm)
        self._server: MetricsServer | None = None
        r = self.service
        self._init_decode(r)
        self._init_colocation(r)
        self._init_jobs(r, self.tenants)
        self._init_memory(r)
        self.requests = Counter("harli_requests_total",
                                "Finished inference requests, by finish reason or error code.",
                                ["outcome"], registry=r)
        self.child_restarts = ReadCounter(r, "harli_child_restarts",
                                          "Restarts of a child process.", ("child",))
        self.child_forced_restarts = ReadCounter(
            r, "harli_child_forced_restarts",
            "Of harli_child_restarts_total, those the daemon forced on a healthy child (MPS "
            "restart-both, decode's shared weights gone); not counted as crashes.", ("child",))
        self.dataset_retokenized = Counter(
            "harli_dataset_retokenized_total",
            "Jobs whose dataset the finetune tokenized again instead of reading the cache "
            "the attach filled (file changed since attach, or the entry gone).", registry=r)
        self.contained_errors = Counter(
            "harli_daemon_contained_errors_total",
            "Failures of the daemon's work for one request or job (a bug, or a system call "
            "that failed): that request or job got an error, the daemon served on.",
            ["part"], registry=r)
        self.dropped_messages = Counter(
            "harli_daemon_dropped_messages_total",
            "Messages from a child the daemon could not decode or has no handler for.",
            ["source", "reason"], registry=r)

    def _init_decode(self, r: CollectorRegistry) -> None:
        self.decode_iterations = Counter("harli_decode_iterations_total",
                                         "Decode engine iterations.", registry=r)
        self.decode_iteration_s = Histogram("harli_decode_iteration_seconds",
                                            "Wall time of one decode iteration.",
                                            buckets=_ITERATION_BUCKETS_S, registry=r)
        self.kv_blocks_free = Gauge("harli_decode_kv_blocks_free",
                                    "Free KV cache blocks after the last iteration.", registry=r)
        self.kv_blocks_lent = Gauge("harli_decode_kv_blocks_lent",
                                    "KV blocks withdrawn from vLLM's free queue and lent.",
                                    registry=r)
        self.tpot_s = Histogram("harli_decode_tpot_seconds",
                                "Time between two tokens of a request (engine clock).",
                                buckets=_ITERATION_BUCKETS_S, registry=r)

    def _init_colocation(self, r: CollectorRegistry) -> None:
        """What no vLLM server exports: the finetune beside decode and the SLO it keeps."""
        self.finetune_quota_level = Gauge(
            "harli_finetune_quota_level",
            "The finetune's compute quota level in force (0: paused).", registry=r)
        self.finetune_lent_bytes = Gauge(
            "harli_finetune_lent_bytes",
            "Arena memory the finetune holds now (pages the ledger lent it: KV blocks decode "
            "does not need, free pages).", registry=r)
        self.tpot_slo_s = Gauge("harli_tpot_slo_seconds",
                                "The decode TPOT SLO in force (NaN: no finetune, none kept).",
                                registry=r)
        self.tpot_predicted_s = Gauge(
            "harli_tpot_predicted_seconds",
            "The predictor's upper bound on a token's latency in the last decode iteration, "
            "from the quota decision made for it (NaN: none, or decode idle).", registry=r)
        self.tpot_measured_s = Gauge(
            "harli_tpot_measured_seconds",
            "What the last decode iteration cost each running request's token, as the "
            "predictor measures it (NaN: decode idle).", registry=r)
        self.tpot_headroom_s = Gauge(
            "harli_tpot_slo_headroom_seconds",
            "harli_tpot_slo_seconds minus harli_tpot_measured_seconds: below 0 when the last "
            "decode iteration missed the SLO (NaN: decode idle, or no SLO).", registry=r)
        for g in (self.tpot_slo_s, self.tpot_predicted_s, self.tpot_measured_s,
                  self.tpot_headroom_s):
            g.set(math.nan)
        self._tpot_idle = True
        self.slo_tokens = Counter("harli_slo_tokens_total",
                                  "Inter-token gaps judged against the TPOT SLO (engine clock).",
                                  registry=r)
        self.slo_tokens_within = Counter("harli_slo_tokens_within_total",
                                         "Of harli_slo_tokens_total, those within the SLO.",
                                         registry=r)
        self.slo_requests = Counter(
            "harli_slo_requests_total",
            "Finished requests of 2 tokens or more judged against the TPOT SLO by their mean "
            "time per output token.", registry=r)
        self.slo_requests_within = Counter("harli_slo_requests_within_total",
                                           "Of harli_slo_requests_total, those within the SLO.",
                                           registry=r)
        self.decision_s = Histogram("harli_scheduler_decision_seconds",
                                    "Time the quota policy takes for one decision.",
                                    buckets=(1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3),
                                    registry=r)
        self.predictor_error = Gauge(
            "harli_predictor_recent_abs_error_ratio",
            "Mean absolute relative error of the recent iteration latency predictions "
            "(0.1: off by 10 % on average).", registry=r)
        self.predictor_drift = ReadCounter(
            r, "harli_predictor_drift_events",
            "Times the online correction drifted past its threshold.")
        self.cpu_fences = Counter("harli_finetune_cpu_fences_total",
                                  "level drops that moved the finetune's threads off decode's "
                                  "cores at once (CPU hosts)", registry=r)
        self.fence_follows = Counter("harli_finetune_fence_follows_total",
                                     "times the finetune narrowed its thread pool mid-chunk "
                                     "to such a fence (CPU hosts)", registry=r)

    def _init_jobs(self, service: CollectorRegistry, tenants: CollectorRegistry) -> None:
        """The finetune's total on the service's registry; each job's series on the
        tenants'."""
        self.finetune_tokens = Counter("harli_finetune_tokens_total",
                                       "Tokens trained (all jobs, redone steps included).",
                                       registry=service)
        self.job_tokens = Gauge("harli_job_tokens_trained", "Tokens trained by a job.",
                                ["job"], registry=tenants)
        self.job_micro_steps = Gauge("harli_job_micro_steps", "Micro-steps done by a job.",
                                     ["job"], registry=tenants)
        self.job_steps = Gauge("harli_job_steps", "Optimizer steps done by a job.", ["job"],
                               registry=tenants)
        self.job_loss = Gauge("harli_job_loss", "Last training loss of a job.", ["job"],
                              registry=tenants)
        self.job_valid_loss = Gauge("harli_job_valid_loss",
                                    "A job's last checkpoint's loss on its validation file.",
                                    ["job"], registry=tenants)
        self.job_valid_accuracy = Gauge(
            "harli_job_valid_accuracy",
            "A job's last checkpoint's next-token accuracy on its validation file (0-1).",
            ["job"], registry=tenants)
        self.job_paused_s = Counter("harli_job_paused_seconds_total",
                                    "Time a job spent paused by the quota decision.", ["job"],
                                    registry=tenants)
        self._job_series: tuple[Gauge | Counter, ...] = (
            self.job_tokens, self.job_micro_steps, self.job_steps, self.job_loss,
            self.job_valid_loss, self.job_valid_accuracy, self.job_paused_s)
        self._jobs_ended: dict[str, float] = {}  # job -> when its series go (daemon clock)

    def _init_memory(self, r: CollectorRegistry) -> None:
        self.arena_pages = Gauge("harli_arena_pages", "Arena pages by owner (ledger).",
                                 ["owner"], registry=r)
        self.lease_saved_bytes = Counter(
            "harli_lease_saved_bytes_total",
            "Bytes autograd saved for backward in the finetune, by where they were placed.",
            ["placement"], registry=r)
        self.lease_fallbacks = Counter(
            "harli_lease_fallback_tensors_total",
            "Saved tensors that did not fit in the lease and stayed in private memory.",
            registry=r)
        self.lease_in_share = Gauge(
            "harli_lease_saved_share",
            "Share of the saved-tensor bytes of the last micro-step placed in the lease.",
            registry=r)
        self.reclaims = Counter("harli_lease_reclaims_total",
                                "Reclaims of leased pages, by outcome.", ["outcome"],
                                registry=r)
        self.reclaim_s = Histogram("harli_lease_reclaim_seconds",
                                   "From a reclaim request to the pages being back.",
                                   buckets=(0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
                                   registry=r)
        self.kv_scrub_s = Histogram("harli_kv_scrub_seconds",
                                    "Decode's time zeroing KV blocks the finetune gave back.",
                                    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5),
                                    registry=r)
        self.lease_errors = Counter("harli_lease_errors_total",
                                    "Lease messages refused by the ledger.", ["child"],
                                    registry=r)

    # -- serving -----------------------------------------------------------------------------

    def serve(self, addr: str, port: int) -> None:
        if not is_loopback(addr):
            logger.warning("[metrics] metrics.addr = %s: the endpoint (job ids, counts; no "
                           "authentication) is reachable beyond this host", addr)
        try:
            self._server = MetricsServer(self.registry, addr, port)
        except OSError as e:
            raise RuntimeError(f"metrics.port: cannot listen on {addr}:{port} ({e.strerror}); "
                               f"choose another port or set metrics.port = 0") from None
        logger.info("[metrics] Prometheus endpoint on http://%s:%d/metrics", addr, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def page(self, tenant_series: bool = True) -> MetricsPage:
        """The page ``/metrics`` serves, in Prometheus' text format (the control API's
        ``GetMetrics``); without the series that name tenants' jobs unless
        ``tenant_series``."""
        registry = self.registry if tenant_series else self.service
        return MetricsPage(text=generate_latest(registry).decode(),
                           content_type=CONTENT_TYPE_PLAIN_0_0_4)

    def on_decode_exit(self) -> None:
        if self.vllm is not None:
            self.vllm.on_decode_exit()

    # -- feeding -----------------------------------------------------------------------------

    def watch_children(self, children: Iterable[RestartCounts]) -> None:
        """Restart counters of each child, read at scrape time rather than in the loop."""
        for child in children:
            self.child_restarts.read((child.name,), _reader(child, "restarts"))
            self.child_forced_restarts.read((child.name,), _reader(child, "forced_restarts"))

    def on_iteration(self, t: IterationTelemetry) -> None:
        self.decode_iterations.inc()
        self.decode_iteration_s.observe(t.end_s - t.start_s)
        self.kv_blocks_free.set(t.kv_blocks_free)
        self.kv_blocks_lent.set(t.kv_blocks_lent)

    def on_token_latency(self, measured_s: float, predicted_s: float | None,
                         slo_s: float | None) -> None:
        """The last iteration's token latency as measured, the bound predicted for it (None:
        no prediction) and the SLO (None: none kept)."""
        self._tpot_idle = False
        self.tpot_measured_s.set(measured_s)
        self.tpot_predicted_s.set(math.nan if predicted_s is None else predicted_s)
        self.tpot_headroom_s.set(math.nan if slo_s is None else slo_s - measured_s)

    def on_idle(self) -> None:
        """No request runs in decode: no iteration will update the gauges that describe the
        last one, so they say so now instead of holding its values."""
        if not self._tpot_idle:
            self._tpot_idle = True
            for g in (self.tpot_predicted_s, self.tpot_measured_s, self.tpot_headroom_s):
                g.set(math.nan)

    def on_slo_tokens(self, judged: int, within: int) -> None:
        self.slo_tokens.inc(judged)
        self.slo_tokens_within.inc(within)

    def on_slo_request(self, within: bool) -> None:
        self.slo_requests.inc()
        if within:
            self.slo_requests_within.inc()

    def on_micro_step(self, r: MicroStepReport) -> None:
        job = str(r.job_id)
        self.finetune_tokens.inc(r.step_tokens)
        self.job_tokens.labels(job).set(r.tokens)
        self.job_micro_steps.labels(job).set(r.micro_step)
        self.job_steps.labels(job).set(r.step)
        self.job_loss.labels(job).set(r.loss)
        if r.paused_s > 0:
            self.job_paused_s.labels(job).inc(r.paused_s)
        self.lease_saved_bytes.labels("lease").inc(r.lease_saved_bytes)
        self.lease_saved_bytes.labels("private").inc(r.private_saved_bytes)
        self.lease_fallbacks.inc(r.fallback_tensors)
        self.fence_follows.inc(r.fence_follows)
        saved = r.lease_saved_bytes + r.private_saved_bytes
        if saved:
            self.lease_in_share.set(r.lease_saved_bytes / saved)

    def on_validation(self, job_id: int, v: ValidationScore) -> None:
        self.job_valid_loss.labels(str(job_id)).set(v.loss)
        self.job_valid_accuracy.labels(str(job_id)).set(v.accuracy)

    def on_job_ended(self, job_id: int, now: float) -> None:
        """A job succeeded, failed or was cancelled: its series go ``JOB_SERIES_KEEP_S``
        after ``now`` (``tick``), once scrapes have seen its final values. The job store
        keeps them (``harli job show``)."""
        self._jobs_ended[str(job_id)] = now + JOB_SERIES_KEEP_S

    def tick(self, now: float) -> None:
        if not self._jobs_ended:
            return
        for job, at in list(self._jobs_ended.items()):
            if now >= at:
                del self._jobs_ended[job]
                for metric in self._job_series:
                    with contextlib.suppress(KeyError):  # never set (older clients raise)
                        metric.remove(job)


def is_loopback(addr: str) -> bool:
    """Whether ``addr`` (an IP address or ``localhost``) names this host's loopback only."""
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to


def _reader(obj: object, attr: str) -> Callable[[], float]:
    return lambda: float(getattr(obj, attr))
