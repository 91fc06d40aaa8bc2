"""``harli profile`` end to end on the real daemon, vLLM and trainer: a small grid measured
through the serving path at level 0 and beside the training finetune, fitted, written,
evaluated with a PNG; a daemon loads the profile, refuses one from another setup (exit 2,
naming the field) and without one learns online, as ``harli status`` shows. Batches naming
adapters are measured, carry their adapter requests, and are scored apart."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from harli.bench.profile import Config, plot, profiling_daemon, run_configs
from harli.client.control import ControlClient
from harli.client.inference import RequestError
from harli.daemon.latency import profile_key
from harli.predictor import (
    FEATURE_NAMES,
    PROFILE_VERSION,
    Profile,
    evaluate,
    fit_levels,
    fit_solo,
)

from .conftest import BASE_OVERRIDES, make_daemon

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]


def test_profile_fit_evaluate_load_and_refuse(tmp_path: Path, tiny_model: Path) -> None:
    overrides = [f'model.path="{tiny_model}"', *BASE_OVERRIDES]
    fit_grid = [Config(b, c, 0) for b, c in ((1, 16), (2, 600), (8, 64), (8, 400))] + \
        [Config(b, c, 0, "1 adapter") for b, c in ((1, 16), (8, 64), (8, 400))] + \
        [Config(8, 64, 0, "4 adapters")] + \
        [Config(b, c, lv) for lv in (1, 2) for b, c in ((1, 64), (8, 256))]
    with profiling_daemon(tmp_path / "p", overrides, None) as run:
        daemon, ctl, job_id = run.daemon, run.ctl, run.job_id
        assert job_id is not None and len(run.adapters) == 4
        started = time.time()
        st = ctl.status()
        assert st.predictor is not None and st.predictor.mode == "online"
        assert st.predictor.since is None  # on the prior: nothing fitted yet
        with pytest.raises(RequestError, match=r"static level must be in 0\.\.4"):
            ctl.set_level(9)
        samples = run_configs(run, fit_grid, repeats=1, seed=0)
        held_out = run_configs(run, [Config(4, 200, 0), Config(4, 200, 2),
                                     Config(4, 200, 0, "half base")], repeats=1, seed=1)
        key = profile_key(daemon.cfg)
        # The live predictor learned from every iteration, at the level each ran at.
        pst = ctl.status().predictor
        assert pst is not None
        seen = pst.samples_seen
        assert seen.get(0, 0) > 0 and seen.get(1, 0) > 0 and seen.get(2, 0) > 0
        # Online: since when stage 1 has stood on live iterations, and each level on its own.
        assert pst.since is not None and started <= pst.since <= time.time()
        assert pst.last_fit is not None and pst.since <= pst.last_fit <= time.time()
        # (a level counts its iterations from stage 1's first fit on)
        assert pst.online_refits >= 1 and set(pst.levels_learnt) <= {1, 2} and pst.levels_learnt
        assert all(pst.since <= t <= time.time() for t in pst.levels_learnt.values())
    # Every measured iteration carries the batch vLLM really ran, at the configured level.
    assert {s.level for s in samples} == {0, 1, 2}
    decode = [s for s in samples if s.config == "b8-c64-l0-decode"]
    assert decode and all(s.shape.num_seqs == 8 and s.shape.prefill_tokens == 0
                          for s in decode)
    assert any(s.shape.prefill_attn_tokens > 0 for s in samples)
    lora = [s for s in samples if s.config == "b8-c64-l0-a4-decode"]
    assert lora and all(s.shape.lora_requests == 8 for s in lora)
    assert all(s.shape.lora_requests == 0 for s in decode)
    half = [s for s in held_out if s.config == "b4-c200-l0-half-decode"]
    assert half and all(s.shape.lora_requests == 2 for s in half)
    solo = fit_solo(samples)
    assert solo.coefficients[FEATURE_NAMES.index("lora_batch")] != 0.0
    profile = Profile(version=PROFILE_VERSION, key=key, created_s=0.0, solo=solo,
                      levels=fit_levels(samples, solo), samples=samples, meta={})
    path = tmp_path / "profile.json"
    path.write_bytes(profile.to_json())
    report = evaluate(Profile.from_json(path.read_bytes()).model(), held_out)
    assert set(report.stages) == {"stage1", "stage2", "stage1 adapters"}
    assert all(0 <= r.within_upper_share <= 1 for r in report.stages.values())
    png = tmp_path / "profile.png"
    plot(report, png, "test")
    assert png.read_bytes()[:4] == b"\x89PNG"

    # A daemon started with the profile uses it ...
    with make_daemon(tmp_path / "d1", tiny_model, f'predictor.profile="{path}"') as d, \
            ControlClient(d.cfg.control_endpoint) as c:
        with d.client() as cl:
            cl.complete([1, 2, 3], max_tokens=8)
        p = c.status().predictor
        assert p is not None and p.mode == "profile" and p.profile == str(path)
        assert p.since is not None and p.since <= time.time() and p.online_refits == 0
        assert p.samples_seen.get(0, 0) >= 8

    # ... and refuses one measured on another setup, naming what differs.
    other = msgspec.structs.replace(profile, key=msgspec.structs.replace(key, dtype="bfloat16"))
    bad = tmp_path / "other.json"
    bad.write_bytes(other.to_json())
    argv = [sys.executable, "-m", "harli.cli.main", "daemon",
            "--set", f'daemon.runtime_dir="{tmp_path / "r3"}"',
            "--set", f'daemon.state_dir="{tmp_path / "s3"}"', "--set", "metrics.port=0",
            "--set", f'predictor.profile="{bad}"', *[a for o in overrides for a in ("--set", o)]]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "dtype: profile bfloat16, daemon float32" in res.stderr, res.stderr[-2000:]
