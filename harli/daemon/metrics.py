"""Prometheus metrics of the daemon (decode iterations, requests, children, finetune jobs),
served over HTTP on ``metrics.addr``:``metrics.port`` (default 127.0.0.1:9464; port 0: none).

The page has no authentication and names job ids, token counts and losses, so it binds loopback
by default and ``serve`` warns when told to bind anything else."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from harli.ipc.decode import IterationTelemetry
from harli.ipc.finetune import MicroStepReport, ValidationScore

logger = logging.getLogger(__name__)

_ITERATION_BUCKETS_S = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05,
                        0.075, 0.1, 0.2, 0.5, 1.0)


class RestartCounts(Protocol):
    """What the restart gauges read of a supervised child (``Child``)."""

    name: str
    restarts: int
    forced_restarts: int


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.decode_iterations = Counter("harli_decode_iterations_total",
                                         "Decode engine iterations.", registry=r)
        self.decode_iteration_s = Histogram("harli_decode_iteration_seconds",
                                            "Wall time of one decode iteration.",
                                            buckets=_ITERATION_BUCKETS_S, registry=r)
        self.decode_batch = Gauge("harli_decode_running_requests",
                                  "Requests in the last decode iteration.", registry=r)
        self.kv_blocks_free = Gauge("harli_decode_kv_blocks_free",
                                    "Free KV cache blocks after the last iteration.", registry=r)
        self.requests = Counter("harli_requests_total", "Finished inference requests.",
                                ["outcome"], registry=r)
        self.child_restarts = Gauge("harli_child_restarts", "Restarts of a child process.",
                                    ["child"], registry=r)
        self.child_forced_restarts = Gauge(
            "harli_child_forced_restarts",
            "Of harli_child_restarts, those the daemon forced on a healthy child (MPS "
            "restart-both, decode's shared weights gone); not counted as crashes.",
            ["child"], registry=r)
        self.finetune_level = Gauge("harli_finetune_level",
                                    "Quota level of the last finetune micro-step.", registry=r)
        self.dataset_retokenized = Counter(
            "harli_dataset_retokenized_total",
            "Jobs whose dataset the finetune tokenized again instead of reading the cache "
            "the attach filled (file changed since attach, or the entry gone).", registry=r)
        self.attach_timeouts = Counter(
            "harli_attach_timeouts_total",
            "Attaches whose check outlasted the client's wait: refused, not stored.",
            registry=r)
        self.finetune_tokens = Counter("harli_finetune_tokens_total",
                                       "Tokens trained (all jobs, redone steps included).",
                                       registry=r)
        self.job_tokens = Gauge("harli_job_tokens_trained", "Tokens trained by a job.",
                                ["job"], registry=r)
        self.job_micro_steps = Gauge("harli_job_micro_steps", "Micro-steps done by a job.",
                                     ["job"], registry=r)
        self.job_steps = Gauge("harli_job_steps", "Optimizer steps done by a job.", ["job"],
                               registry=r)
        self.job_loss = Gauge("harli_job_loss", "Last training loss of a job.", ["job"],
                              registry=r)
        self.job_valid_loss = Gauge("harli_job_valid_loss",
                                    "A job's last checkpoint's loss on its validation file.",
                                    ["job"], registry=r)
        self.job_valid_accuracy = Gauge(
            "harli_job_valid_accuracy",
            "A job's last checkpoint's next-token accuracy on its validation file (0-1).",
            ["job"], registry=r)
        self.preemptions = Counter("harli_decode_preemptions_total",
                                   "Requests vLLM's scheduler preempted (out of KV blocks).",
                                   registry=r)
        self.kv_blocks_lent = Gauge("harli_decode_kv_blocks_lent",
                                    "KV blocks withdrawn from vLLM's free queue and lent.",
                                    registry=r)
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
        self.predictor_error = Gauge(
            "harli_predictor_abs_pct_error",
            "Recent mean absolute percentage error of the iteration latency prediction.",
            registry=r)
        self.predictor_drift = Gauge("harli_predictor_drift_events",
                                     "Times the online correction drifted past its threshold.",
                                     registry=r)
        self.tpot_s = Histogram("harli_decode_tpot_seconds",
                                "Time between two tokens of a request (engine clock).",
                                buckets=_ITERATION_BUCKETS_S, registry=r)
        self.slo_attainment = Gauge("harli_slo_attainment",
                                    "Share meeting the TPOT SLO since start, per token or "
                                    "per request.", ["by"], registry=r)
        self.cpu_fences = Counter("harli_finetune_cpu_fences_total",
                                  "level drops that moved the finetune's threads off decode's "
                                  "cores at once (CPU hosts)", registry=r)
        self.fence_follows = Counter("harli_finetune_fence_follows_total",
                                     "times the finetune narrowed its thread pool mid-chunk "
                                     "to such a fence (CPU hosts)", registry=r)
        self.decision_s = Histogram("harli_scheduler_decision_seconds",
                                    "Time the quota policy takes for one decision.",
                                    buckets=(1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3),
                                    registry=r)
        self.job_paused_s = Counter("harli_job_paused_seconds_total",
                                    "Time a job spent paused by the quota decision.", ["job"],
                                    registry=r)
        self.dropped_messages = Counter(
            "harli_daemon_dropped_messages_total",
            "Messages from a child the daemon could not decode or has no handler for.",
            ["source", "reason"], registry=r)

    def serve(self, addr: str, port: int) -> None:
        if not is_loopback(addr):
            logger.warning("[metrics] metrics.addr = %s: the endpoint (job ids, counts; no "
                           "authentication) is reachable beyond this host", addr)
        try:
            start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise RuntimeError(f"metrics.port: cannot listen on {addr}:{port} ({e.strerror}); "
                               f"choose another port or set metrics.port = 0") from None
        logger.info("[metrics] Prometheus endpoint on http://%s:%d/metrics", addr, port)

    def watch_children(self, children: Iterable[RestartCounts]) -> None:
        """Restart gauges of each child, read at scrape time rather than in the loop."""
        for child in children:
            self.child_restarts.labels(child.name).set_function(_reader(child, "restarts"))
            self.child_forced_restarts.labels(child.name).set_function(
                _reader(child, "forced_restarts"))

    def on_iteration(self, t: IterationTelemetry) -> None:
        self.decode_iterations.inc()
        self.decode_iteration_s.observe(t.end_s - t.start_s)
        self.decode_batch.set(t.num_running)
        self.kv_blocks_free.set(t.kv_blocks_free)
        self.kv_blocks_lent.set(t.kv_blocks_lent)
        if t.preempted:
            self.preemptions.inc(t.preempted)

    def on_micro_step(self, r: MicroStepReport) -> None:
        job = str(r.job_id)
        self.finetune_level.set(r.level)
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
