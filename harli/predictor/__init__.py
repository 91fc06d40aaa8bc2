"""Two-stage decode-latency predictor: stage 1 predicts a decode iteration's solo latency from
its batch (``features``, ``fit``), stage 2 corrects it per finetune quota level; ``model`` adds
the online correction from live telemetry (``correction``, ``online``); ``profile`` stores the
fits, ``evaluate`` scores them. Pure logic: imports no torch and no ZMQ."""

from harli.predictor.evaluate import ConfigRow, EvalReport, StageReport, evaluate
from harli.predictor.features import FEATURE_NAMES, BatchShape, token_latency_s, vector
from harli.predictor.fit import LevelFit, Sample, SoloFit, fit_levels, fit_solo
from harli.predictor.model import LatencyModel, LatencyModelConfig, Prediction
from harli.predictor.profile import (
    PROFILE_VERSION,
    Profile,
    ProfileError,
    ProfileKey,
    hardware_fingerprint,
)

__all__ = [
    "FEATURE_NAMES",
    "PROFILE_VERSION",
    "BatchShape",
    "ConfigRow",
    "EvalReport",
    "LatencyModel",
    "LatencyModelConfig",
    "LevelFit",
    "Prediction",
    "Profile",
    "ProfileError",
    "ProfileKey",
    "Sample",
    "SoloFit",
    "StageReport",
    "evaluate",
    "fit_levels",
    "fit_solo",
    "hardware_fingerprint",
    "token_latency_s",
    "vector",
]
