"""The versioned latency profile: fitted stages plus the samples they were fit on, as JSON.

A profile is only valid for the setup it was measured on, so it carries a ``ProfileKey``
(model, backend, dtype, hardware, harli version); ``mismatches`` tells the daemon exactly
which fields differ from its own. Decoding is typed (msgspec): a malformed file or an
unknown ``version`` raises ``ProfileError`` saying what is wrong with it.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import msgspec

from harli.predictor.features import FEATURE_NAMES
from harli.predictor.fit import LevelFit, Sample, SoloFit, fit_levels, fit_solo
from harli.predictor.model import LatencyModel, LatencyModelConfig

PROFILE_VERSION = 1


class ProfileError(ValueError):
    """A profile file that cannot be used as is; the message says why."""


class ProfileKey(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    backend: str
    dtype: str
    hardware: str
    harli_version: str


class Profile(msgspec.Struct, kw_only=True):
    version: int
    key: ProfileKey
    created_s: float  # wall-clock (time.time()) when profiling finished
    solo: SoloFit | None
    levels: dict[int, LevelFit] = msgspec.field(default_factory=dict)
    samples: list[Sample] = msgspec.field(default_factory=list)
    meta: dict[str, Any] = msgspec.field(default_factory=dict)

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes, *, source: str = "profile",
                  any_features: bool = False) -> Profile:
        """Decode a profile; ``source`` (e.g. the file path) names it in errors.
        ``any_features``: accept fits on another feature set (to ``refit`` its samples)."""
        try:
            header = msgspec.json.decode(data, type=_Header)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ProfileError(f"{source}: not a harli latency profile ({e})") from e
        if header.version != PROFILE_VERSION:
            raise ProfileError(f"{source}: profile version {header.version} is not supported "
                               f"(this harli reads version {PROFILE_VERSION}); re-run profiling")
        try:
            profile = msgspec.json.decode(data, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ProfileError(f"{source}: malformed profile: {e}") from e
        if (not any_features and profile.solo is not None
                and profile.solo.feature_names != FEATURE_NAMES):
            raise ProfileError(f"{source}: fit on features {list(profile.solo.feature_names)}, "
                               f"this harli uses {list(FEATURE_NAMES)}; re-run profiling, or "
                               f"fit its iterations again: harli profile --refit {source} "
                               f"--out NEW")
        bad = [level for level, fit in profile.levels.items() if fit.level != level]
        if bad or (profile.levels and profile.solo is None):
            raise ProfileError(f"{source}: malformed profile: inconsistent level fits")
        return profile

    def mismatches(self, expected: ProfileKey) -> list[str]:
        """One line per key field that differs: "dtype: profile float32, daemon bfloat16"."""
        return [f"{name}: profile {getattr(self.key, name)}, daemon {getattr(expected, name)}"
                for name in ProfileKey.__struct_fields__
                if getattr(self.key, name) != getattr(expected, name)]

    def refit(self) -> Profile:
        """This profile with both stages fit again on its stored samples (in their measured
        order), e.g. after harli's fits gained a field; ValueError if it has too few."""
        solo = fit_solo([s for s in self.samples if s.level == 0])
        levels = fit_levels([s for s in self.samples if s.level > 0], solo)
        return Profile(version=self.version, key=self.key, created_s=self.created_s,
                       solo=solo, levels=levels, samples=self.samples,
                       meta=dict(self.meta))

    def model(self, config: LatencyModelConfig | None = None) -> LatencyModel:
        if self.solo is None:
            raise ProfileError("profile has no stage-1 fit; use LatencyModel.online instead")
        return LatencyModel(self.solo, self.levels, config=config)


class _Header(msgspec.Struct):
    """Read first, alone, so a newer schema gets a version error rather than a field error."""

    version: int


def hardware_fingerprint() -> str:
    """CPU model and logical core count (pure stdlib); callers append the GPU name."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass  # not Linux: fall back to what platform knows
    cpu = cpu or platform.processor() or platform.machine() or "unknown-cpu"
    return f"{cpu} x{os.cpu_count() or 0}"
