"""How well a latency model predicts measured iterations, per stage and per configuration.

Accuracy is judged on per-configuration medians (the median measured vs the median predicted
estimate of each measured configuration at each level), so a configuration with many samples
does not dominate; the bound is judged per single sample (share with measured <= upper).
"Stage1" is the level-0 samples, "stage2" those beside the finetune (level > 0); iterations
whose batch had requests for an adapter are reported apart ("stage1 adapters", "stage2
adapters"), as they run vLLM's slower LoRA path. Pure: the model is only asked to predict,
never to observe.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from harli.predictor.fit import Sample
from harli.predictor.model import LatencyModel


@dataclass(frozen=True, slots=True)
class ConfigRow:
    config: str
    level: int
    adapters: bool  # its iterations' batches had requests for an adapter
    n: int
    median_measured_s: float
    median_estimate_s: float
    ape_pct: float  # |median estimate - median measured| / median measured, in percent
    within_upper_share: float


@dataclass(frozen=True, slots=True)
class StageReport:
    n_configs: int
    n_samples: int
    mean_ape_pct: float
    p95_ape_pct: float
    within_upper_share: float  # share of single samples with measured <= upper
    rows: tuple[ConfigRow, ...]


@dataclass(frozen=True, slots=True)
class EvalReport:
    # "stage1", "stage2", "stage1 adapters", "stage2 adapters"; one without samples is absent
    stages: dict[str, StageReport]


def evaluate(model: LatencyModel, samples: Iterable[Sample], min_config_samples: int = 1,
             online: bool = False) -> EvalReport:
    """Per stage: the error of the predicted median against the measured median of each
    configuration with at least ``min_config_samples`` iterations (a "median" of two noisy
    iterations says little), and the share of all single iterations under the upper bound.

    ``online``: the predictor as the daemon runs it - samples in the order they were
    measured, each predicted first and then fed back as a residual (``observe``), so a
    prediction only ever uses iterations before it. The model is changed by this."""
    groups: dict[tuple[str, int, bool], list[tuple[float, float, float]]] = {}
    for i, s in enumerate(samples):
        p = model.predict(s.shape, s.level)
        key = (s.config, s.level, s.shape.lora_requests > 0)
        groups.setdefault(key, []).append((s.latency_s, p.estimate_s, p.upper_s))
        if online:
            model.observe(s.shape, s.level, s.latency_s, float(i))
    stages: dict[str, StageReport] = {}
    for adapters in (False, True):
        for name, solo in (("stage1", True), ("stage2", False)):
            rows = tuple(_row(*key, groups[key]) for key in sorted(groups)
                         if (key[1] == 0) == solo and key[2] == adapters)
            if rows:
                stages[name + " adapters" * adapters] = _stage(rows, min_config_samples)
    return EvalReport(stages)


def _row(config: str, level: int, adapters: bool,
         points: list[tuple[float, float, float]]) -> ConfigRow:
    measured_s = statistics.median(m for m, _, _ in points)
    estimate_s = statistics.median(e for _, e, _ in points)
    within = sum(1 for m, _, u in points if m <= u)
    return ConfigRow(config, level, adapters, len(points), measured_s, estimate_s,
                     100.0 * abs(estimate_s - measured_s) / measured_s, within / len(points))


def _stage(all_rows: tuple[ConfigRow, ...], min_config_samples: int) -> StageReport:
    rows = tuple(r for r in all_rows if r.n >= min_config_samples) or all_rows
    apes = np.array([r.ape_pct for r in rows])
    n_samples = sum(r.n for r in all_rows)
    within = sum(r.within_upper_share * r.n for r in all_rows)
    return StageReport(len(rows), n_samples, float(apes.mean()), float(np.quantile(apes, 0.95)),
                       within / n_samples, rows)
