"""``LendingStatLogger``: vLLM's own Prometheus stat logger for the decode engine, with the KV
blocks lent to the finetune counted as free.

The decode process runs vLLM's ``PrometheusStatLogger`` as ``vllm serve`` runs it, so every
``vllm:`` family (names, types, labels, buckets, values) is vLLM's. Its values go to
prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by the daemon for
decode), which the daemon reads into its metrics page: no message carries them, and a page is
as fresh as the last iteration.

One value differs on purpose. A block lent to the finetune is withdrawn from vLLM's free
queue, so vLLM's ``kv_cache_usage_perc`` would count it as used; the daemon takes it back as
soon as decode needs it, so for a router choosing a server it is free, and it is counted so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm.v1.metrics.loggers import PrometheusStatLogger
from vllm.v1.metrics.stats import SchedulerStats


class LendingStatLogger(PrometheusStatLogger):
    lent_blocks: Callable[[], int] | None = None
    usable_blocks = 0

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
        super().__init__(vllm_config, engine_indexes)
        # In multiprocess mode a gauge never set has no sample at all; vllm serve's (one
        # process) read 0 from the start, and a router may look for them before any request.
        for idx in self.engine_indexes:
            self.record(SchedulerStats(), None, engine_idx=idx)

    def count_lent(self, lent_blocks: Callable[[], int], usable_blocks: int) -> None:
        """Told by the engine once it exists (vLLM builds this logger inside it): the blocks
        lent now, and the usable blocks (vLLM's null block is never free)."""
        self.lent_blocks = lent_blocks
        self.usable_blocks = usable_blocks

    def record(self, scheduler_stats: Any, iteration_stats: Any,
               mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
        lent = self.lent_blocks() if self.lent_blocks is not None else 0
        if scheduler_stats is not None and lent and self.usable_blocks > 0:
            scheduler_stats.kv_cache_usage = max(
                0.0, scheduler_stats.kv_cache_usage - lent / self.usable_blocks)
        super().record(scheduler_stats, iteration_stats, mm_cache_stats=mm_cache_stats,
                       engine_idx=engine_idx)
