"""``VllmMetrics``: vLLM's Prometheus metric contract, fed from what the daemon sees.

Routers that pick a decode server (the Gateway API Inference Extension's endpoint picker,
llm-d's) read a vLLM server's ``/metrics`` by name. The daemon exports the part of that page
they use with vLLM's names, types, help text, label names and bucket boundaries (vLLM 0.32,
``vllm/v1/metrics/loggers.py``, ``PrometheusStatLogger``; ``vllm/v1/metrics/buckets.py``), so
that it stands in for a vLLM decode server. Labels: ``model_name`` is the served base model's
name (what ``harli models`` lists first), ``engine`` is "0" (one engine core).

The values come from decode's iteration telemetry and from the frontend's view of each
request (its ``StepOutputs``); each method says what it measures where that differs from vLLM's
engine core. Times are unix (wall) times of this host: the daemon's accept of a request, and
decode's clock at a scheduling or at the end of an iteration.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from harli.ipc.decode import IterationTelemetry

MODEL_LABELS = ("model_name", "engine")
# vLLM's FinishReason strings: each gets its series at start, as vLLM does.
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")

# vLLM 0.32's default buckets (vllm/v1/metrics/buckets.py), copied: the daemon never imports
# vLLM, and a router or dashboard comparing servers needs the same boundaries.
TIME_TO_FIRST_TOKEN_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0)


def finished_reason(reason: str) -> str:
    """vLLM's ``finished_reason`` for a request's ``finish_reason``: vLLM's own as they are;
    the daemon's own ends (``shutdown``, ``adapter_removed``) are aborts, which is what vLLM
    calls a request it stopped before its end."""
    return reason if reason in FINISHED_REASONS else "abort"


class VllmMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str,
                 max_loras: int | None) -> None:
        """``max_loras``: vLLM's ``max_loras`` when LoRA serving is on (None: off, and no
        ``vllm:lora_requests_info``, as in vLLM)."""
        r = registry
        values = (model_name, "0")

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, MODEL_LABELS, registry=r).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, MODEL_LABELS, registry=r).labels(*values)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, MODEL_LABELS, buckets=buckets,
                             registry=r).labels(*values)

        self.running = gauge("vllm:num_requests_running",
                             "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting",
                             "Number of requests waiting to be processed.")
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc",
                                    "KV-cache usage. 1 means 100 percent usage.")
        self.preemptions = counter("vllm:num_preemptions",
                                   "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.")
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*MODEL_LABELS, "finished_reason"], registry=r)
        self.success = {reason: success.labels(*values, reason) for reason in FINISHED_REASONS}
        self.ttft_s = histogram("vllm:time_to_first_token_seconds",
                                "Histogram of time to first token in seconds.",
                                TIME_TO_FIRST_TOKEN_BUCKETS_S)
        self.itl_s = histogram("vllm:inter_token_latency_seconds",
                               "Histogram of inter-token latency in seconds.",
                               INTER_TOKEN_LATENCY_BUCKETS_S)
        self.e2e_s = histogram("vllm:e2e_request_latency_seconds",
                               "Histogram of e2e request latency in seconds.",
                               REQUEST_LATENCY_BUCKETS_S)
        self.queue_s = histogram("vllm:request_queue_time_seconds",
                                 "Histogram of time spent in WAITING phase for request.",
                                 REQUEST_LATENCY_BUCKETS_S)
        self.max_loras = max_loras
        self.lora_info = Gauge(
            "vllm:lora_requests_info", "Running stats on lora requests.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=r) if max_loras is not None else None
        self._lora_labels: tuple[str, str, str] | None = None
        self._idle_waiting: int | None = None  # what on_idle last set (None: busy since)
        self.on_idle()

    # -- the engine, per iteration -----------------------------------------------------------

    def on_iteration(self, t: IterationTelemetry) -> None:
        """One decode iteration. Running and waiting are vLLM's scheduler queues as the batch
        was scheduled. KV usage counts the blocks requests hold: blocks lent to the finetune
        count as free, since the daemon takes them back as soon as decode needs them."""
        self._idle_waiting = None
        self.running.set(t.num_running)
        self.waiting.set(t.num_waiting)
        usable = t.kv_blocks_total - 1  # vLLM's null block is never free
        used = usable - t.kv_blocks_free - t.kv_blocks_lent
        self.kv_cache_usage.set(max(0, used) / usable if usable > 0 else 0.0)
        if t.preempted:
            self.preemptions.inc(t.preempted)
        self._set_loras(t.running_lora_adapters, t.waiting_lora_adapters)

    def on_idle(self, waiting: int = 0) -> None:
        """No request is running in the engine: none in flight at all, or decode is not
        running and ``waiting`` requests wait in the daemon for it. Without this the gauges
        would hold the last iteration's values for as long as decode stays idle."""
        if self._idle_waiting == waiting:
            return  # called on every idle loop turn: set once
        self._idle_waiting = waiting
        self.running.set(0)
        self.waiting.set(waiting)
        self.kv_cache_usage.set(0.0)
        self._set_loras((), ())

    def _set_loras(self, running: list[str] | tuple[()], waiting: list[str] | tuple[()]
                   ) -> None:
        """vLLM's info gauge: the adapters in its labels, the time of the update as its value
        (a router takes the series with the latest). Only the current label set is kept: a
        daemon serving many adapters over weeks would otherwise keep every combination."""
        if self.lora_info is None:
            return
        labels = (str(self.max_loras), ",".join(waiting), ",".join(running))
        if labels != self._lora_labels:
            if self._lora_labels is not None:
                self.lora_info.remove(*self._lora_labels)
            self._lora_labels = labels
        self.lora_info.labels(*labels).set_to_current_time()

    # -- requests, from the frontend ---------------------------------------------------------

    def on_first_token(self, ttft_s: float, prompt_tokens: int) -> None:
        """A request's first token: from the daemon's accept to the end of the iteration that
        produced it. Its prompt counts as processed now, as in vLLM."""
        self.ttft_s.observe(ttft_s)
        self.prompt_tokens.inc(prompt_tokens)

    def on_token_gap(self, gap_s: float) -> None:
        """One output of a request after its first: the time since its previous output (one
        observation per output, as vLLM makes it, however many tokens it carries)."""
        self.itl_s.observe(gap_s)

    def on_generated(self, tokens: int) -> None:
        self.generation_tokens.inc(tokens)

    def on_finished(self, reason: str, e2e_s: float, queue_s: float | None) -> None:
        """A request ended with ``finish_reason`` ``reason`` (an error reply is not a
        finish: the daemon counts those in ``harli_requests_total`` only). ``e2e_s``: from
        the daemon's accept to its last output; ``queue_s``: from the accept to vLLM's first
        scheduling of it (the wait for a decode that was starting included), None when it
        was never scheduled (aborted while waiting: not observed)."""
        self.success[finished_reason(reason)].inc()
        self.e2e_s.observe(e2e_s)
        if queue_s is not None:
            self.queue_s.observe(queue_s)
