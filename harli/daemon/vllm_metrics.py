"""``DecodeVllmMetrics``: vLLM's own metric families, as decode's engine records them, on the
daemon's page.

Routers that pick a decode server (vllm-router, the Gateway API Inference Extension's endpoint
picker, llm-d's) read a vLLM server's ``/metrics`` by name. Decode runs vLLM's
``PrometheusStatLogger`` as ``vllm serve`` runs it (``harli.decode_proc.stat_logger``), so every
``vllm:`` family is vLLM's: names, types, help, labels, buckets and values. Its values live in
prometheus-client's multiprocess files (``cfg.vllm_metrics_dir``, one file per kind and
decode pid); this collector merges them at scrape time.

Across decode restarts, counters and histograms of every incarnation are summed, so they only
grow over the daemon's life. Gauges describe the engine now: a decode that ended takes its
gauges with it (``on_decode_exit``), and the next one sets its own as it starts and steps.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

PREFIX = "vllm:"


class DecodeVllmMetrics(Collector):
    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self) -> None:
        """An empty directory, before any decode starts: values a previous daemon's decode
        left there describe nothing now."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def on_decode_exit(self) -> None:
        """Decode ended: its gauges (requests running, KV usage, its adapters) went with it.
        Only one decode runs at a time, so every gauge file is the one that ended."""
        for f in self.path.glob("gauge_*.db"):
            f.unlink(missing_ok=True)

    def collect(self) -> Iterator[Metric]:
        files = sorted(str(f) for f in self.path.glob("*.db"))
        try:
            families = _merge(files)
        except FileNotFoundError:
            # A gauge file removed between the listing and the read (decode just ended).
            families = _merge([f for f in files if Path(f).exists()])
        for family in families:
            if family.name.startswith(PREFIX):
                yield family

    def describe(self) -> Iterable[Metric]:
        return []  # names known only once decode has run: none to check at registration


def _merge(files: list[str]) -> Iterable[Metric]:
    """The families in ``files``, counters and histograms summed over processes, gauges by
    their multiprocess mode (vLLM's are "mostrecent")."""
    merged: Iterable[Metric] = MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
        files, accumulate=True)
    return merged
