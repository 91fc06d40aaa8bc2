"""Stage 1 learnt online, for a daemon that starts without a profile.

``SoloAccumulator`` keeps the weighted least-squares sufficient statistics (X^T W X and
X^T W y over the feature vector, W = 1/latency^2, the same weighting as ``fit_solo``) of every
level-0 iteration seen, plus a bounded window of recent samples for the upper bound's
quantile. ``fit`` solves the normal equations; the model calls it every N new samples.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from harli.predictor.features import FEATURE_NAMES, BatchShape, vector
from harli.predictor.fit import SoloFit, solo_fit_from


class SoloAccumulator:
    def __init__(self, window: int) -> None:
        k = len(FEATURE_NAMES)
        self.xtwx = np.zeros((k, k))
        self.xtwy = np.zeros(k)
        self.n = 0
        self.window: deque[tuple[BatchShape, float]] = deque(maxlen=window)

    def add(self, shape: BatchShape, latency_s: float) -> None:
        x = np.asarray(vector(shape))
        w = 1.0 / (latency_s * latency_s)
        self.xtwx += w * np.outer(x, x)
        self.xtwy += (w * latency_s) * x
        self.n += 1
        self.window.append((shape, latency_s))

    def n_features(self) -> int:
        """Features seen non-zero so far (the others stay out of the fit)."""
        return int(np.count_nonzero(np.diag(self.xtwx) > 0.0))

    def fit(self, quantile: float, bias_alpha: float) -> SoloFit:
        active = np.diag(self.xtwx) > 0.0
        coefficients = np.zeros(len(FEATURE_NAMES))
        # lstsq rather than solve: a feature that so far moved in lockstep with another
        # (e.g. decode_tokens == num_seqs while no prefill ran) leaves the system singular.
        coefficients[active] = np.linalg.lstsq(self.xtwx[np.ix_(active, active)],
                                               self.xtwy[active], rcond=None)[0]
        shapes = [shape for shape, _ in self.window]
        latencies_s = [latency_s for _, latency_s in self.window]
        fit = solo_fit_from(tuple(float(c) for c in coefficients), shapes, latencies_s,
                            quantile=quantile, bias_alpha=bias_alpha)
        # n counts every sample in the sufficient statistics, not just the window.
        return dataclasses.replace(fit, n=self.n)
