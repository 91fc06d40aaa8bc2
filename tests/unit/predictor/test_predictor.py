"""Latency predictor: fits recover known synthetic models, online correction and drift
detection, the prediction invariant, profile files, and evaluation."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import statistics
from types import SimpleNamespace

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harli.predictor import (
    FEATURE_NAMES,
    PROFILE_VERSION,
    BatchShape,
    LatencyModel,
    LatencyModelConfig,
    LevelFit,
    Profile,
    ProfileError,
    ProfileKey,
    Sample,
    SoloFit,
    evaluate,
    fit_levels,
    fit_solo,
    hardware_fingerprint,
    vector,
)
from harli.predictor.fit import TAIL_QUANTILES, tail_ratio

TRUE_COEFS = (8e-3, 2e-4, 5e-5, 3e-5, 4e-4, 2e-3, 6e-3, 5e-5)  # in FEATURE_NAMES order
TRUE_LEVELS = {1: (1.10, 1e-3), 2: (1.25, 2e-3), 3: (1.60, 3e-3)}  # level: (scale, offset_s)
KEY = ProfileKey(model="qwen-0.5b", backend="vllm-0.9", dtype="bfloat16", hardware="h100 x16",
                 harli_version="0.1.0")


def true_solo_s(shape: BatchShape) -> float:
    return sum(c * x for c, x in zip(TRUE_COEFS, vector(shape), strict=True))


def true_latency_s(shape: BatchShape, level: int) -> float:
    solo_s = true_solo_s(shape)
    if level == 0:
        return solo_s
    scale, offset_s = TRUE_LEVELS[level]
    return scale * solo_s + offset_s


def random_shape(rng: random.Random, *, prefill: bool = True, lora: bool = True) -> BatchShape:
    num_seqs = rng.randint(1, 64)
    n = rng.randint(0, 2048) if prefill and rng.random() < 0.7 else 0
    c = rng.randint(0, 4096)
    lora_requests = rng.randint(1, num_seqs) if lora and rng.random() < 0.4 else 0
    return BatchShape(num_seqs=num_seqs, decode_tokens=rng.randint(0, num_seqs),
                      prefill_tokens=n, context_tokens=rng.randint(0, 65536),
                      prefill_attn_tokens=n * (c + n), lora_requests=lora_requests)


def make_samples(rng: random.Random, n: int, levels: tuple[int, ...] = (0,),
                 noise: float = 0.02, prefill: bool = True, lora: bool = True) -> list[Sample]:
    configs = [random_shape(rng, prefill=prefill, lora=lora) for _ in range(25)]
    out = []
    for i in range(n):
        # Half repeat a named configuration (for medians), half are one-off shapes.
        idx = i % len(configs)
        shape, config = ((configs[idx], f"cfg{idx}") if i % 2 else
                         (random_shape(rng, prefill=prefill, lora=lora), f"rand{i % 7}"))
        for level in levels:
            latency_s = true_latency_s(shape, level) * math.exp(rng.gauss(0.0, noise))
            out.append(Sample(shape, level, latency_s, config))
    return out


def model_from(samples: list[Sample], *, config: LatencyModelConfig | None = None,
               quantile: float = 0.99) -> LatencyModel:
    """Both stages fit on ``samples`` (as a profile's are), the bias EWMA's weight from
    ``config``."""
    alpha = (config if config is not None else LatencyModelConfig()).ewma_alpha
    solo = fit_solo(samples, quantile=quantile, bias_alpha=alpha)
    return LatencyModel(solo, fit_levels(samples, solo, quantile=quantile, bias_alpha=alpha),
                        config=config)


def fitted_model(seed: int = 0, **cfg: float) -> LatencyModel:
    samples = make_samples(random.Random(seed), 800, levels=(0, 1, 2, 3))
    return model_from(samples, config=LatencyModelConfig(**cfg))  # type: ignore[arg-type]


SHAPE = BatchShape(num_seqs=16, decode_tokens=16, prefill_tokens=0, context_tokens=8000)


# -- features ---------------------------------------------------------------------------------


def test_feature_vector_matches_names_and_scales() -> None:
    shape = BatchShape(num_seqs=4, decode_tokens=3, prefill_tokens=100, context_tokens=2500,
                       prefill_attn_tokens=2_000_000)
    assert len(vector(shape)) == len(FEATURE_NAMES)
    assert vector(shape) == (1.0, 4.0, 3.0, 100.0, 2.5, 2.0, 0.0, 0.0)
    # Any adapter request puts the whole batch on the LoRA path: the indicator and all of
    # its tokens, however many of its requests name an adapter.
    for lora_requests in (1, 4):
        lora = dataclasses.replace(shape, lora_requests=lora_requests)
        assert vector(lora)[-2:] == (1.0, 103.0)


def test_shape_from_telemetry_duck_typed_and_old_records() -> None:
    old = SimpleNamespace(num_running=5, decode_tokens=4, prefill_tokens=7, context_tokens=90)
    assert BatchShape.from_telemetry(old) == BatchShape(5, 4, 7, 90, 0)
    new = SimpleNamespace(**vars(old), prefill_attn_tokens=11, lora_requests=2)
    assert BatchShape.from_telemetry(new).prefill_attn_tokens == 11
    assert BatchShape.from_telemetry(new).lora_requests == 2
    with pytest.raises(ValueError, match=">= 0"):
        BatchShape(num_seqs=-1, decode_tokens=0, prefill_tokens=0, context_tokens=0)


# -- offline fits -----------------------------------------------------------------------------


def test_fit_solo_recovers_known_coefficients() -> None:
    # decode_tokens moves the latency least (a few % of it): 4000 samples pin it within 5 %.
    fit = fit_solo(make_samples(random.Random(1), 4000))
    assert fit.coefficients == pytest.approx(TRUE_COEFS, rel=0.05)
    assert fit.n == 4000
    assert fit.feature_names == FEATURE_NAMES
    # 2% lognormal noise: the 99th percentile ratio is about exp(2.33 * 0.02).
    assert 1.0 < fit.ratio_q < 1.08


def test_fit_solo_drops_all_zero_features() -> None:
    # No prefill and no adapter (a profile of a daemon serving the base model only).
    fit = fit_solo(make_samples(random.Random(2), 2000, prefill=False, lora=False))
    absent = [FEATURE_NAMES.index(name) for name in ("prefill_tokens", "prefill_attn_mtokens",
                                                      "lora_batch", "lora_tokens")]
    assert [fit.coefficients[i] for i in absent] == [0.0] * len(absent)
    kept = [i for i in range(len(FEATURE_NAMES)) if i not in absent]
    assert [fit.coefficients[i] for i in kept] == pytest.approx([TRUE_COEFS[i] for i in kept],
                                                                rel=0.05)


def test_fit_solo_refuses_too_few_samples() -> None:
    samples = make_samples(random.Random(3), 4)
    with pytest.raises(ValueError, match="4 level-0 samples for 8 features"):
        fit_solo(samples)
    with pytest.raises(ValueError, match="quantile"):
        fit_solo(make_samples(random.Random(3), 100), quantile=1.5)


def test_fit_levels_recovers_scale_and_offset_per_level() -> None:
    samples = make_samples(random.Random(4), 1000, levels=(0, 1, 2, 3))
    solo = fit_solo(samples)
    levels = fit_levels(samples, solo)
    assert sorted(levels) == [1, 2, 3]
    for level, (scale, offset_s) in TRUE_LEVELS.items():
        assert levels[level].scale == pytest.approx(scale, rel=0.05)
        assert levels[level].offset_s == pytest.approx(offset_s, rel=0.25, abs=5e-4)
        assert levels[level].ratio_q >= 1.0


def test_fit_levels_names_a_level_with_too_few_samples() -> None:
    samples = make_samples(random.Random(5), 300)
    samples.append(Sample(SHAPE, 4, 0.05, "one"))
    with pytest.raises(ValueError, match="level 4 has 1 samples"):
        fit_levels(samples, fit_solo(samples))


# -- prediction -------------------------------------------------------------------------------


def test_predict_level0_is_stage1_and_levels_apply_stage2() -> None:
    model = fitted_model()
    p0 = model.predict(SHAPE, 0)
    assert p0.estimate_s == pytest.approx(true_solo_s(SHAPE), rel=0.03)
    assert p0.upper_s >= p0.estimate_s
    for level in TRUE_LEVELS:
        p = model.predict(SHAPE, level)
        assert p.estimate_s == pytest.approx(true_latency_s(SHAPE, level), rel=0.03)
    assert model.stats()["fallback_predictions"] == {}


def test_unprofiled_level_falls_back_to_nearest_lower_times_factor() -> None:
    model = fitted_model(fallback_factor=1.5)
    p3 = model.predict(SHAPE, 3)
    p5 = model.predict(SHAPE, 5)
    assert p5.estimate_s == pytest.approx(1.5 * p3.estimate_s)
    assert p5.upper_s >= p5.estimate_s
    assert model.stats()["fallback_predictions"] == {5: 1}
    with pytest.raises(ValueError, match="level"):
        model.predict(SHAPE, -1)


def test_predictions_leave_the_model_as_they_found_it() -> None:
    """The daemon asks every level's bound before each iteration and observes only the one it
    ran: predict and upper_bounds must change nothing a later prediction or stats() reads.
    (What a predict costs is a benchmark: python -m harli.bench.decision_cost.)"""
    model = fitted_model()
    rng = random.Random(6)
    for i in range(300):  # give the levels online corrections, as in a running daemon
        model.observe(SHAPE, i % 4, true_latency_s(SHAPE, i % 4) * (1 + rng.gauss(0, 0.02)),
                      now=float(i))
    shapes = [random_shape(rng) for _ in range(100)]
    before = model.stats()
    first = [model.predict(shape, level) for shape in shapes for level in range(4)]
    bounds = [model.upper_bounds(shape, 3) for shape in shapes]
    assert [model.predict(shape, level) for shape in shapes for level in range(4)] == first
    assert [model.upper_bounds(shape, 3) for shape in shapes] == bounds
    assert model.stats() == before
    assert [u for b in bounds for u in b] == [p.upper_s for p in first]
    assert all(0.0 < p.estimate_s <= p.upper_s < math.inf for p in first)


# -- online correction ------------------------------------------------------------------------


def test_drift_fires_after_step_change_once(caplog: pytest.LogCaptureFixture) -> None:
    model = fitted_model()
    rng = random.Random(7)
    caplog.set_level(logging.WARNING, logger="harli.predictor.model")
    for i in range(400):
        shape = random_shape(rng)
        step = 1.0 if i < 200 else 1.4  # the finetune changed: 40% slower from i = 200
        model.observe(shape, 2, true_latency_s(shape, 2) * step * math.exp(rng.gauss(0, 0.05)),
                      now=float(i))
        if i == 199:
            assert model.stats()["drift_events"] == {2: 0}
    stats = model.stats()
    # Once per kind of iteration (decode-only, with prefill): each has its own correction.
    assert stats["drift_events"] == {2: 2}
    assert stats["in_drift"] == [2]
    assert 200 < stats["last_drift_s"][2] < 400  # type: ignore[index]
    assert [r for r in caplog.records if "drift at level 2" in r.getMessage()]
    # The bias now corrects the prediction toward the new latency.
    assert model.predict(SHAPE, 2).estimate_s == pytest.approx(
        1.4 * true_latency_s(SHAPE, 2), rel=0.05)


def test_no_drift_on_stationary_noise() -> None:
    model = fitted_model()
    rng = random.Random(8)
    for i in range(3000):
        shape = random_shape(rng)
        level = i % 4
        model.observe(shape, level, true_latency_s(shape, level) * math.exp(rng.gauss(0, 0.05)),
                      now=float(i))
    stats = model.stats()
    assert stats["drift_events"] == {0: 0, 1: 0, 2: 0, 3: 0}
    assert stats["samples_seen"] == {0: 750, 1: 750, 2: 750, 3: 750}
    assert stats["recent_mean_abs_pct_error"] < 6.0  # type: ignore[operator]


def test_live_spread_widens_the_bound() -> None:
    model = fitted_model()
    before = model.predict(SHAPE, 1)
    rng = random.Random(9)
    for i in range(500):  # ten times the fitted noise, no bias
        model.observe(SHAPE, 1, true_latency_s(SHAPE, 1) * math.exp(rng.gauss(0, 0.2)), now=i)
    after = model.predict(SHAPE, 1)
    assert after.upper_s / after.estimate_s > 1.3 * before.upper_s / before.estimate_s


def test_online_mode_prior_then_converges() -> None:
    model = LatencyModel.online(prior_latency_s=0.2)
    assert model.predict(SHAPE, 0) == (0.2, 0.4)
    assert model.predict(SHAPE, 2) == (0.2, 0.4)
    assert model.stats()["mode"] == "online"
    assert model.stats()["profile_loaded"] is False
    rng = random.Random(10)
    for i in range(2000):
        shape = random_shape(rng)
        level = (0, 0, 1, 2)[i % 4]
        model.observe(shape, level, true_latency_s(shape, level) * math.exp(rng.gauss(0, 0.02)),
                      now=float(i))
    stats = model.stats()
    assert stats["fitted"] is True
    assert stats["online_refits"] == 1 + (1000 - 50) // 200
    assert stats["online_levels"] == [1, 2]
    assert [model.measured(lv) for lv in range(4)] == [True, True, True, False]
    assert not LatencyModel.online(prior_latency_s=0.2).measured(0)  # on the prior
    # When each stage took over (observe's clock): stage 1 at the 50th level-0 iteration
    # (i = 97), refit every 200 more (400 iterations in all); each level at its 20th iteration
    # measured against stage 1 (from i = 98 and 99 on, every fourth).
    assert stats["first_fit_s"] == 97.0
    assert stats["last_fit_s"] == 97.0 + 400 * (stats["online_refits"] - 1)  # type: ignore[operator]
    assert stats["levels_learnt_s"] == {1: 98 + 4 * 19, 2: 99 + 4 * 19}
    assert model.solo is not None
    assert model.solo.coefficients == pytest.approx(TRUE_COEFS, rel=0.1)
    for level in (0, 1, 2):
        p = model.predict(SHAPE, level)
        # Online stage 2 is a pure ratio, which cannot express the levels' offsets: it is
        # right on average over the shapes seen, a few percent off for a small batch.
        assert p.estimate_s == pytest.approx(true_latency_s(SHAPE, level),
                                             rel=0.05 if level == 0 else 0.1)
        assert p.upper_s >= p.estimate_s
    assert stats["drift_events"] == {0: 0, 1: 0, 2: 0}  # not while levels ran on fallback
    assert stats["recent_mean_abs_pct_error"] < 5.0  # type: ignore[operator]


def test_model_config_and_constructor_validate() -> None:
    with pytest.raises(ValueError, match="ewma_alpha"):
        LatencyModelConfig(ewma_alpha=0.0)
    with pytest.raises(ValueError, match="conservative"):
        LatencyModelConfig(fallback_factor=0.9)
    with pytest.raises(ValueError, match="prior_latency_s"):
        LatencyModel(None, {})
    model = LatencyModel.online(prior_latency_s=0.1)
    with pytest.raises(ValueError, match="measured_s"):
        model.observe(SHAPE, 0, 0.0, now=0.0)


shapes_st = st.builds(BatchShape, num_seqs=st.integers(0, 512), decode_tokens=st.integers(0, 512),
                      prefill_tokens=st.integers(0, 8192), context_tokens=st.integers(0, 10**6),
                      prefill_attn_tokens=st.integers(0, 10**8))
observations_st = st.lists(st.tuples(shapes_st, st.integers(0, 6),
                                     st.floats(1e-6, 1e3, allow_nan=False)), max_size=60)
_FITTED = fitted_model()


@settings(max_examples=60, deadline=None)
@given(shape=shapes_st, level=st.integers(0, 8), observations=observations_st,
       online=st.booleans())
def test_upper_at_least_estimate_above_zero(shape: BatchShape, level: int,
                                            observations: list[tuple[BatchShape, int, float]],
                                            online: bool) -> None:
    cfg = LatencyModelConfig(online_min_samples=5, refit_every=10, level_min_samples=3)
    model = (LatencyModel.online(prior_latency_s=0.05, config=cfg) if online else
             LatencyModel(_FITTED.solo, _FITTED.levels, config=cfg))
    for i, (obs_shape, obs_level, measured_s) in enumerate(observations):
        model.observe(obs_shape, obs_level, measured_s, now=float(i))
        p = model.predict(shape, level)
        assert p.upper_s >= p.estimate_s > 0
    p = model.predict(shape, level)
    assert p.upper_s >= p.estimate_s > 0
    assert math.isfinite(p.upper_s)


# -- profile ----------------------------------------------------------------------------------


def make_profile() -> Profile:
    model = fitted_model()
    samples = make_samples(random.Random(11), 20, levels=(0, 1))
    return Profile(version=PROFILE_VERSION, key=KEY, created_s=1.7e9, solo=model.solo,
                   levels=model.levels, samples=samples, meta={"gpu": "H100", "iters": 20})


def test_profile_json_round_trip_and_model() -> None:
    profile = make_profile()
    back = Profile.from_json(profile.to_json())
    assert back == profile
    assert back.samples[0].shape == profile.samples[0].shape
    assert back.model().predict(SHAPE, 2) == profile.model().predict(SHAPE, 2)
    assert back.model().stats()["profile_loaded"] is True


def test_profile_key_mismatches_name_each_field() -> None:
    profile = make_profile()
    assert profile.mismatches(KEY) == []
    daemon = ProfileKey(model="qwen-0.5b", backend="vllm-0.9", dtype="float32",
                        hardware="a100 x8", harli_version="0.1.0")
    assert profile.mismatches(daemon) == ["dtype: profile bfloat16, daemon float32",
                                          "hardware: profile h100 x16, daemon a100 x8"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not json", "p.json: not a harli latency profile"),
        (b"{}", "p.json: not a harli latency profile"),
        (b'{"version": 99, "anything": 1}', "p.json: profile version 99 is not supported"),
        (b'{"version": 1, "key": {"model": "m"}}', "p.json: malformed profile"),
        (b'{"version": 1, "key": {"model": "m", "backend": "b", "dtype": "d", "hardware": "h",'
         b' "harli_version": "v"}, "created_s": 0, "solo": null, "samples": [{"shape": {'
         b'"num_seqs": 1, "decode_tokens": 1, "prefill_tokens": 0, "context_tokens": 0},'
         b' "level": 0, "latency_s": -1.0, "config": "c"}]}', "latency_s must be > 0"),
    ],
)
def test_bad_profiles_raise_profile_error(data: bytes, match: str) -> None:
    with pytest.raises(ProfileError, match=match):
        Profile.from_json(data, source="p.json")


def test_profile_with_other_feature_set_is_refused() -> None:
    data = make_profile().to_json().replace(b'"intercept"', b'"bias"')
    with pytest.raises(ProfileError, match="re-run profiling, or fit its iterations again"):
        Profile.from_json(data)


def test_profile_of_an_older_feature_set_refits_on_its_samples() -> None:
    """A profile fit before the adapter features (its samples carry no ``lora_requests``)
    loads for a refit, and the refit leaves the adapter coefficients at 0."""
    old_names = [n for n in FEATURE_NAMES if not n.startswith("lora_")]
    old = msgspec.json.decode(make_profile().to_json())
    old["solo"]["feature_names"] = old_names
    old["solo"]["coefficients"] = old["solo"]["coefficients"][:len(old_names)]
    for s in old["samples"]:
        del s["shape"]["lora_requests"]
    data = msgspec.json.encode(old)
    with pytest.raises(ProfileError):
        Profile.from_json(data)
    refit = Profile.from_json(data, any_features=True).refit()
    assert refit.solo is not None and refit.solo.feature_names == FEATURE_NAMES
    lora = [FEATURE_NAMES.index(n) for n in ("lora_batch", "lora_tokens")]
    assert [refit.solo.coefficients[i] for i in lora] == [0.0, 0.0]


def test_hardware_fingerprint_names_cpu_and_cores() -> None:
    fp = hardware_fingerprint()
    assert fp and fp.rsplit(" x", 1)[1].isdigit()


# -- evaluation -------------------------------------------------------------------------------


def perfect_model() -> LatencyModel:
    solo = SoloFit(TRUE_COEFS, FEATURE_NAMES, n=1, quantile=0.99, ratio_q=1.0, spread_log=0.0,
                   floor_s=1e-4)
    levels = {lv: LevelFit(lv, scale, offset_s, n=1, quantile=0.99, ratio_q=1.0, spread_log=0.0,
                           floor_s=1e-4) for lv, (scale, offset_s) in TRUE_LEVELS.items()}
    return LatencyModel(solo, levels)


def test_evaluate_perfect_model_has_zero_error_and_full_bound_share() -> None:
    samples = make_samples(random.Random(12), 400, levels=(0, 1, 2, 3), noise=0.0)
    report = evaluate(perfect_model(), samples)
    # Batches with adapters are reported apart from the base model's.
    assert sorted(report.stages) == ["stage1", "stage1 adapters", "stage2", "stage2 adapters"]
    stage1, stage2 = report.stages["stage1"], report.stages["stage2"]
    lora1, lora2 = report.stages["stage1 adapters"], report.stages["stage2 adapters"]
    n_lora = sum(1 for s in samples if s.level == 0 and s.shape.lora_requests)
    assert 0 < n_lora < 400
    assert (stage1.n_samples, lora1.n_samples) == (400 - n_lora, n_lora)
    assert (stage2.n_samples, lora2.n_samples) == (3 * (400 - n_lora), 3 * n_lora)
    assert all(not r.adapters for r in stage1.rows) and all(r.adapters for r in lora1.rows)
    keys = {(s.config, s.shape.lora_requests > 0) for s in samples}
    assert stage1.n_configs + lora1.n_configs == len(keys)
    assert stage2.n_configs + lora2.n_configs == 3 * len(keys)
    for stage in (stage1, stage2, lora1, lora2):
        assert stage.mean_ape_pct == 0.0
        assert stage.p95_ape_pct == 0.0
        assert stage.within_upper_share == 1.0
        assert all(row.ape_pct == 0.0 for row in stage.rows)
    # Fit on the same noiseless data: the error is rounding only.
    fitted = evaluate(model_from(samples), samples)
    assert fitted.stages["stage1"].mean_ape_pct == pytest.approx(0.0, abs=1e-6)
    assert fitted.stages["stage2"].p95_ape_pct == pytest.approx(0.0, abs=1e-6)


def test_evaluate_noisy_model_reports_error() -> None:
    samples = make_samples(random.Random(13), 400, levels=(0, 1))
    report = evaluate(model_from(samples, quantile=0.9), samples)
    assert 0.0 < report.stages["stage1"].mean_ape_pct < 5.0
    assert 0.85 < report.stages["stage1"].within_upper_share < 0.95


def test_token_latency_counts_the_gap_only_when_the_engine_ran_back_to_back() -> None:
    from types import SimpleNamespace as T

    from harli.predictor import token_latency_s

    prev = T(incarnation=1, iteration=7, num_running=3, start_s=1.000, end_s=1.010)
    t = T(incarnation=1, iteration=8, num_running=3, start_s=1.012, end_s=1.020)
    assert token_latency_s(t, prev) == pytest.approx(0.010)  # loop overhead counts
    assert token_latency_s(t, None) == pytest.approx(0.008)
    idle = T(incarnation=1, iteration=8, num_running=1, start_s=1.5, end_s=1.508)
    assert token_latency_s(idle, prev) == pytest.approx(0.008)  # the engine had been idle
    restarted = T(incarnation=2, iteration=8, num_running=3, start_s=1.012, end_s=1.020)
    assert token_latency_s(restarted, prev) == pytest.approx(0.008)


# -- the bound after the online bias ------------------------------------------------------------


def drifting_samples(n: int, seed: int = 0, *, level: int = 0) -> list[Sample]:
    """One shape measured on a host whose speed drifts slowly (a bounded random walk, up to
    ~1.6x apart, as this VM's CPU does over a minute) under a small per-iteration noise."""
    rng = random.Random(seed)
    drift_log, out = 0.0, []
    for _ in range(n):
        drift_log = min(0.25, max(-0.25, drift_log + rng.gauss(0.0, 0.01)))
        latency_s = true_latency_s(SHAPE, level) * math.exp(drift_log + rng.gauss(0.0, 0.03))
        out.append(Sample(SHAPE, level, latency_s, "drift"))
    return out


def test_tracked_bound_leaves_out_the_drift_the_bias_follows() -> None:
    from harli.predictor.fit import tracked_bound

    samples = drifting_samples(5000)
    measured = [s.latency_s for s in samples]
    predicted = [true_solo_s(SHAPE)] * len(samples)
    ratios = sorted(m / p for m, p in zip(measured, predicted, strict=True))
    raw_q = ratios[int(0.99 * len(ratios))]
    tracked = tracked_bound(measured, predicted, [False] * len(samples), quantile=0.99)
    assert tracked.ratio_q < 1.15 < raw_q  # noise sigma 0.03 -> p99 ~1.07; the drift alone 1.28
    assert 0.0 < tracked.spread_log < 0.06
    assert tracked.tail[TAIL_QUANTILES.index(0.99)] == pytest.approx(tracked.ratio_q)
    assert list(tracked.tail) == sorted(tracked.tail) and tracked.tail[0] >= 1.0
    # Too few samples for a warmed-up bias: no tighter than the raw bound.
    few = tracked_bound(measured[:5], predicted[:5], [False] * 5, quantile=1.0)
    assert few.ratio_q == pytest.approx(max(m / p for m, p in zip(measured[:5], predicted[:5],
                                                                     strict=True)))


def test_model_bound_covers_a_drifting_host_and_is_tighter_than_the_raw_one() -> None:
    fit_on = drifting_samples(4000, seed=2)
    model = model_from(fit_on)
    solo = model.solo
    assert solo is not None and solo.tracked_ratio_q is not None
    assert solo.tracked_ratio_q < solo.ratio_q
    raw = LatencyModel(dataclasses.replace(solo, tracked_ratio_q=None, tracked_spread_log=None,
                                           tracked_tail=None), {})
    covered, tight = [], []
    for i, s in enumerate(drifting_samples(4000, seed=3)):
        p, r = model.predict(s.shape, 0), raw.predict(s.shape, 0)
        covered.append(s.latency_s <= p.upper_s)
        tight.append(p.upper_s / r.upper_s)
        model.observe(s.shape, 0, s.latency_s, now=float(i))
        raw.observe(s.shape, 0, s.latency_s, now=float(i))
    assert sum(covered) / len(covered) >= 0.98  # a 0.99 bound, on a fresh run of the host
    assert statistics.median(tight) < 0.9


def test_bias_is_trusted_only_after_its_warmup() -> None:
    from harli.predictor.fit import bias_warmup

    model = model_from(drifting_samples(2000, seed=4))
    solo = model.solo
    assert solo is not None and solo.tracked_ratio_q is not None
    warmup = bias_warmup(LatencyModelConfig().ewma_alpha)
    for i in range(warmup - 1):
        model.observe(SHAPE, 0, true_solo_s(SHAPE), now=float(i))
        p = model.predict(SHAPE, 0)
        assert p.upper_s == pytest.approx(p.estimate_s * solo.ratio_q)  # still the raw bound
    model.observe(SHAPE, 0, true_solo_s(SHAPE), now=float(warmup))
    p = model.predict(SHAPE, 0)
    assert p.upper_s / p.estimate_s == pytest.approx(solo.tracked_ratio_q, rel=0.2)


def test_profile_without_tracked_bounds_still_loads_and_uses_the_raw_one() -> None:
    profile = make_profile()
    data = msgspec.json.decode(profile.to_json())
    for fit in (data["solo"], *data["levels"].values()):
        del fit["tracked_ratio_q"], fit["tracked_spread_log"], fit["tracked_tail"]
    old = Profile.from_json(msgspec.json.encode(data))
    assert old.solo is not None and old.solo.tracked_ratio_q is None
    model = old.model()
    for i in range(100):
        model.observe(SHAPE, 0, true_solo_s(SHAPE), now=float(i))
    p = model.predict(SHAPE, 0)
    assert p.upper_s == pytest.approx(p.estimate_s * old.solo.ratio_q)


def test_profile_refit_fits_the_stored_samples_again() -> None:
    profile = make_profile()
    stale = Profile(version=profile.version, key=profile.key, created_s=profile.created_s,
                    solo=dataclasses.replace(profile.solo, coefficients=(1.0,) * 6),  # type: ignore[type-var]
                    levels=profile.levels, samples=make_samples(random.Random(5), 300, (0, 1)),
                    meta=profile.meta)
    again = stale.refit()
    assert again.samples == stale.samples and again.key == stale.key
    assert again.solo == fit_solo(stale.samples)
    assert again.levels == fit_levels([s for s in stale.samples if s.level > 0], again.solo)
    with pytest.raises(ValueError, match="level-0 samples"):
        Profile(version=PROFILE_VERSION, key=KEY, created_s=0.0, solo=None).refit()


@given(st.lists(st.floats(1.0, 5.0), min_size=len(TAIL_QUANTILES),
                max_size=len(TAIL_QUANTILES)).map(sorted),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_tail_ratio_is_monotone_and_hits_the_grid(tail: list[float], q1: float,
                                                  q2: float) -> None:
    lo, hi = sorted((q1, q2))
    eps = 1 + 1e-12  # exp(log(x)) may round up by an ulp
    assert tail[0] <= tail_ratio(tail, lo) * eps
    assert tail_ratio(tail, lo) <= tail_ratio(tail, hi) * eps
    assert tail_ratio(tail, hi) <= tail[-1] * eps
    for q, r in zip(TAIL_QUANTILES, tail, strict=True):
        assert tail_ratio(tail, q) == pytest.approx(r)


def test_the_bound_follows_the_attainment_target() -> None:
    samples = drifting_samples(4000, seed=6)
    bounds = {}
    for q in (0.9, 0.99, 0.999):
        model = model_from(samples, config=LatencyModelConfig(quantile=0.99))
        model = LatencyModel(model.solo, {}, config=LatencyModelConfig(quantile=q))
        for i in range(100):
            model.observe(SHAPE, 0, true_solo_s(SHAPE), now=float(i))
        p = model.predict(SHAPE, 0)
        bounds[q] = p.upper_s / p.estimate_s
    solo = model_from(samples).solo
    assert solo is not None and solo.tracked_ratio_q is not None
    assert bounds[0.9] < bounds[0.99] < bounds[0.999]
    assert bounds[0.99] == pytest.approx(solo.tracked_ratio_q, rel=0.02)


def test_an_old_profile_at_another_quantile_is_named_in_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    solo = model_from(drifting_samples(500)).solo
    assert solo is not None
    old = dataclasses.replace(solo, tracked_ratio_q=None, tracked_spread_log=None,
                              tracked_tail=None)
    with caplog.at_level(logging.WARNING):
        LatencyModel(old, {}, config=LatencyModelConfig(quantile=0.95))
    assert "harli profile --refit" in caplog.text


def test_predict_at_a_quantile_reads_the_fits_tail_after_warmup() -> None:
    samples = drifting_samples(3000, seed=7)
    model = model_from(samples)
    solo = model.solo
    assert solo is not None and solo.tracked_tail is not None
    # Before the bias has warmed up: the raw bound, whatever the quantile asked.
    raw = model.predict(SHAPE, 0, 0.9)
    assert raw.upper_s == pytest.approx(raw.estimate_s * solo.ratio_q)
    for i in range(100):
        model.observe(SHAPE, 0, true_solo_s(SHAPE), now=float(i))
    default = model.predict(SHAPE, 0)
    assert model.predict(SHAPE, 0, 0.99) == default  # the configured quantile
    ratios = []
    for q in (0.9, 0.95, 0.98, 0.99, 0.995, 0.999):
        p = model.predict(SHAPE, 0, q)
        assert p.estimate_s == default.estimate_s  # the quantile moves the bound only
        ratios.append(p.upper_s / p.estimate_s)
    assert ratios == sorted(ratios)
    spread = default.upper_s / default.estimate_s / solo.tracked_ratio_q  # type: ignore[operator]
    assert ratios[0] == pytest.approx(tail_ratio(solo.tracked_tail, 0.9) * spread)
    assert model.stats()["quantile_unsupported"] == 0


def test_a_quantile_on_a_fit_without_a_tail_keeps_its_bound_and_is_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    solo = model_from(drifting_samples(500)).solo
    assert solo is not None
    old = dataclasses.replace(solo, tracked_tail=None)
    model = LatencyModel(old, {})
    for i in range(100):
        model.observe(SHAPE, 0, true_solo_s(SHAPE), now=float(i))
    with caplog.at_level(logging.WARNING):
        assert model.predict(SHAPE, 0, 0.9) == model.predict(SHAPE, 0)
        model.predict(SHAPE, 0, 0.9)
    assert "no tail" in caplog.text
    assert model.stats()["quantile_unsupported"] == 1  # once per quantile, then cached
    with pytest.raises(ValueError, match="quantile"):
        model.predict(SHAPE, 0, 1.5)


def test_predict_memo_follows_the_shape_and_the_fit() -> None:
    model = fitted_model()
    small, big = BatchShape(2, 2, 0, 200), BatchShape(16, 16, 0, 8000)
    alone = {s: LatencyModel(model.solo, model.levels).predict(s, 2) for s in (small, big)}
    for s in (small, big, small, small, big):  # the memo holds the last shape only
        assert model.predict(s, 2) == alone[s]
    online = LatencyModel.online(
        prior_latency_s=0.01, config=LatencyModelConfig(online_min_samples=5, refit_every=5))
    rng = random.Random(3)
    shape = random_shape(rng, prefill=False)
    for i in range(10):  # the first fit
        s = random_shape(rng, prefill=False)
        online.observe(s, 0, true_solo_s(s) * 1.5, now=float(i))
    first_fit = online.solo
    online.predict(shape, 0)  # memoized under the first fit
    for i in range(10, 40):  # refits on other latencies
        s = random_shape(rng, prefill=False)
        online.observe(s, 0, true_solo_s(s), now=float(i))
    assert online.solo is not first_fit
    same_fields = dataclasses.replace(shape)  # equal, but not the memoized object
    assert same_fields is not shape
    assert online.predict(shape, 0) == online.predict(same_fields, 0)


# -- the host's drift, carried to the levels that are not running -----------------------------

def _run(model: LatencyModel, level: int, host: float, n: int, rng: random.Random,
         t0: float = 0.0) -> None:
    """``n`` decode-only iterations at ``level`` on a host ``host`` times slower than fitted."""
    for i in range(n):
        shape = random_shape(rng, prefill=False)
        model.observe(shape, level, true_latency_s(shape, level) * host
                      * math.exp(rng.gauss(0, 0.02)), now=t0 + i)


def test_a_level_that_has_not_run_follows_the_hosts_drift_seen_by_the_one_that_did() -> None:
    rng = random.Random(3)
    model = fitted_model()
    _run(model, 0, 1.3, 300, rng)  # a slow stretch, the finetune paused
    _run(model, 2, 1.3, 300, rng)
    assert model.predict(SHAPE, 0).estimate_s == pytest.approx(1.3 * true_solo_s(SHAPE),
                                                               rel=0.05)
    _run(model, 2, 1.0, 600, rng)  # the host speeds up while only level 2 runs
    # Level 0 was never measured on the faster host, but the drift level 2 saw carries over
    # (all but the share each level keeps as its own, 10 % by default): a bias of its own
    # would still say 1.3x.
    assert model.predict(SHAPE, 0).estimate_s == pytest.approx(true_solo_s(SHAPE), rel=0.08)
    assert model.stats()["bias"][0] == pytest.approx(0.0, abs=0.08)  # type: ignore[index]
    # When level 0 runs again it starts from there, not from its stale 1.3x.
    _run(model, 0, 1.0, 1, rng)
    assert model.predict(SHAPE, 0).estimate_s == pytest.approx(true_solo_s(SHAPE), rel=0.08)
    # With every level on its own (the rule before the host's share), the stale bias stays.
    alone = fitted_model(level_bias_share=1.0)
    _run(alone, 0, 1.3, 300, rng)
    _run(alone, 2, 1.0, 600, rng)
    assert alone.predict(SHAPE, 0).estimate_s == pytest.approx(1.3 * true_solo_s(SHAPE),
                                                               rel=0.05)


def test_levels_that_alternate_keep_their_own_biases() -> None:
    """Level 2 runs 20 % over its fit, level 0 on it: each keeps its own bias, however long
    they alternate (a shared drift folded into both would let their gap wander)."""
    rng = random.Random(4)
    model = fitted_model()
    for i in range(3000):
        shape = random_shape(rng, prefill=False)
        level, extra = (0, 1.0) if (i // 3) % 2 else (2, 1.2)  # three of each in turn
        model.observe(shape, level, true_latency_s(shape, level) * extra
                      * math.exp(rng.gauss(0, 0.05)), now=float(i))
    assert model.predict(SHAPE, 0).estimate_s == pytest.approx(true_solo_s(SHAPE), rel=0.05)
    assert model.predict(SHAPE, 2).estimate_s == pytest.approx(
        1.2 * true_latency_s(SHAPE, 2), rel=0.05)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), observed=st.integers(0, 600),
       quantile=st.sampled_from([None, 0.9, 0.97, 0.99, 0.999]),
       online=st.booleans())
def test_upper_bounds_are_predict_of_every_level(seed: int, observed: int,
                                                 quantile: float | None, online: bool) -> None:
    """The policy's one-pass bounds equal ``predict`` level by level: before and after the
    biases warm up (a (level, prefill) bias needs 20 iterations: up to 600 spread over ten
    keys), at another quantile, with and without prefill, for a level (4) that has no fit of
    its own and falls back to the one below it, and in online mode across stage-1 refits
    (levels above 0 on their online ratios)."""
    rng = random.Random(seed)
    model = LatencyModel.online(
        0.01, config=LatencyModelConfig(online_min_samples=30, refit_every=40)) \
        if online else fitted_model()
    for i in range(observed):
        s = random_shape(rng)
        level = rng.randint(0, 4)
        model.observe(s, level, true_latency_s(s, min(level, 3)) * rng.uniform(0.8, 1.3),
                      now=float(i))
        if i % 50 == 0:
            shape = random_shape(rng)
            assert model.upper_bounds(shape, 4, quantile) == \
                [model.predict(shape, level, quantile).upper_s for level in range(5)]
    for _ in range(5):
        shape = random_shape(rng)
        assert model.upper_bounds(shape, 4, quantile) == \
            [model.predict(shape, level, quantile).upper_s for level in range(5)]
    with pytest.raises(ValueError, match="level"):
        model.upper_bounds(shape, -1)
    prior = LatencyModel.online(prior_latency_s=0.01)
    assert prior.upper_bounds(shape, 2) == [prior.predict(shape, 0).upper_s] * 3


def test_a_profiled_level_is_measured_and_one_on_the_fallback_is_not() -> None:
    model = fitted_model()  # levels 0-3 profiled
    assert [model.measured(lv) for lv in range(5)] == [True, True, True, True, False]
