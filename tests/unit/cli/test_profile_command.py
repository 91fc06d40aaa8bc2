"""``harli profile`` without a daemon: --refit, and the user errors it exits 2 on (an unreadable
profile, one too small to fit, one measured on another setup)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harli.cli.main import main
from harli.predictor import (
    PROFILE_VERSION,
    BatchShape,
    Profile,
    ProfileKey,
    Sample,
    fit_levels,
    fit_solo,
)

KEY = ProfileKey(model="tiny@0", backend="vllm-cpu", dtype="bfloat16", hardware="cpu x2",
                 harli_version="0.1.0")


def _samples(n: int = 200) -> list[Sample]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        seqs = rng.randint(1, 32)
        shape = BatchShape(num_seqs=seqs, decode_tokens=seqs, prefill_tokens=0,
                           context_tokens=rng.randint(16, 4096))
        for level in (0, 1):
            latency_s = (2e-3 + 1e-4 * seqs + 1e-7 * shape.context_tokens) * (1 + 0.3 * level)
            out.append(Sample(shape, level, latency_s * rng.uniform(0.98, 1.02), f"c{i % 9}"))
    return out


def _write(path: Path, samples: list[Sample], *, fitted: bool) -> Path:
    solo = fit_solo(samples) if fitted else None
    levels = fit_levels([s for s in samples if s.level > 0], solo) if solo else {}
    path.write_bytes(Profile(version=PROFILE_VERSION, key=KEY, created_s=1.0, solo=solo,
                             levels=levels, samples=samples, meta={"quick": True}).to_json())
    return path


def test_refit_writes_the_stored_iterations_fitted_again(tmp_path: Path) -> None:
    old = _write(tmp_path / "old.json", _samples(), fitted=False)
    new = tmp_path / "new.json"
    assert main(["profile", "--refit", str(old), "--out", str(new)]) == 0
    got = Profile.from_json(new.read_bytes())
    samples = Profile.from_json(old.read_bytes()).samples
    assert got.key == KEY and got.samples == samples
    assert got.solo == fit_solo(samples)
    assert set(got.levels) == {1}
    assert got.meta["quick"] is True and got.meta["refitted_s"] > 0
    assert old.read_bytes() != new.read_bytes()


def test_refit_of_a_profile_without_iterations_is_a_user_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _write(tmp_path / "empty.json", [], fitted=False)
    assert main(["profile", "--refit", str(old), "--out", str(tmp_path / "new.json")]) == 2
    assert f"harli profile: {old}: " in capsys.readouterr().err
    assert not (tmp_path / "new.json").exists()


def test_an_unreadable_profile_is_named(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.json"
    assert main(["profile", "--evaluate", str(missing)]) == 2
    assert f"cannot read {missing}: No such file or directory" in capsys.readouterr().err
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{}")
    assert main(["profile", "--evaluate", str(garbage)]) == 2
    assert "not a harli latency profile" in capsys.readouterr().err


def test_evaluate_refuses_a_profile_of_another_setup_before_measuring(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from harli.bench import profile as bench_profile
    from harli.config import load

    cfg = load(None, ['model.dtype="float32"'])
    started: list[list[str]] = []

    @contextlib.contextmanager
    def fake_daemon(base_dir: Path, overrides: list[str], config_file: Path | None,
                    seed: int = 0) -> Iterator[Any]:
        started.append(overrides)
        yield bench_profile.ProfilingRun(SimpleNamespace(cfg=cfg), None, None, [])

    def no_measuring(*args: Any, **kwargs: Any) -> list[Any]:
        raise AssertionError("measured against a profile that does not fit")

    monkeypatch.setattr(bench_profile, "profiling_daemon", fake_daemon)
    monkeypatch.setattr(bench_profile, "run_configs", no_measuring)
    profile = _write(tmp_path / "p.json", _samples(), fitted=True)
    argv = ["profile", "--evaluate", str(profile), "--set", 'model.dtype="float32"']
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"harli profile: {profile} does not fit this daemon: " in err
    assert "dtype: profile bfloat16, daemon float32" in err
    assert started == [['model.dtype="float32"']]
