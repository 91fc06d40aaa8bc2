"""What the policy's fake predictors share: ``upper_bounds`` from their own ``predict``."""

from __future__ import annotations

from harli.predictor import BatchShape, Prediction


class BoundsFromPredict:
    """``LatencyPredictor.upper_bounds`` as ``predict``'s ``upper_s`` level by level (what
    ``LatencyModel.upper_bounds`` is tested to equal)."""

    def predict(self, shape: BatchShape, level: int,
                quantile: float | None = None) -> Prediction:
        raise NotImplementedError

    def measured(self, level: int) -> bool:
        return True  # every level predicted on its own: no probes

    def upper_bounds(self, shape: BatchShape, top_level: int,
                     quantile: float | None = None) -> list[float]:
        return [self.predict(shape, level, quantile).upper_s for level in range(top_level + 1)]
