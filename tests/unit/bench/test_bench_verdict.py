"""The bench's verdict in words, from the block figures and their intervals; the auto SLO; and
its policy names, checked before any daemon starts."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest

from harli.bench import blocks as bl
from harli.bench.bench import calibrate_slo_ms, cpu_times, phase_at, steal_pct, verdict
from harli.bench.workload import default_spec


def _res(harli_trained: int, static2_ok: int = 100, steal: float | None = 1.0,
         cycles: int = 8) -> dict[str, Any]:
    blocks = []
    for c in range(cycles):
        drift = 1 + 0.04 * ((c * 5) % 3 - 1)
        for p, trained, ok in (("decode-only", 0, 100), ("static:1", 100, 100),
                               ("static:2", 200, static2_ok if c % 2 else 100),
                               ("static:3", 300, 70), ("harli", harli_trained, 100)):
            blocks.append(bl.Block(p, c, "busy", 0.0, 3.0, 100, ok, round(trained * drift)))
    v = bl.verdict(blocks, {"busy": 1.0}, 0.99, resamples=300)
    return {"slo_ms": 6.0, "verdict": asdict(v), "host_steal_pct": steal}


def test_verdict_gives_the_ratio_and_its_interval_to_the_best_static_level() -> None:
    text = verdict(_res(260))
    assert text.startswith("harli kept 100.0 % (100.0-100.0) of tokens within the 6.0 ms SLO "
                           "(decode alone: 100.0 % (100.0-100.0))")
    assert "trained 1.30x (95 % CI 1." in text
    assert "the tokens/s of static:2, the best static level whose interval meets 99% per " \
        "token" in text
    assert "not decided" not in text and "steal" not in text and "hypervisor" not in text
    assert "of the best mix in hindsight" in text


def test_verdict_says_when_the_data_cannot_decide() -> None:
    assert "whether harli trains more than static:2 is not decided by this run" in \
        verdict(_res(200))
    # static:2 misses in half the cycles: static:1 is the best level shown to meet the target.
    text = verdict(_res(200, static2_ok=96))
    assert "of static:1" in text


def test_verdict_says_when_no_static_level_met_the_target() -> None:
    res = _res(200)
    v = res["verdict"]
    v["best_static"], v["ratio"] = None, {"value": None, "lo": None, "hi": None}
    assert "no static level's interval met 99% per token" in verdict(res)


def test_verdict_names_the_hypervisors_steal_only_when_it_is_material() -> None:
    assert "hypervisor" not in verdict(_res(260, steal=2.0))
    assert "the hypervisor took 37 % of this VM's CPU time" in verdict(_res(260, steal=37.0))


def test_the_auto_slo_is_a_margin_over_what_decode_alone_keeps_at_the_target() -> None:
    gaps = [0.005] * 990 + [0.050] * 10  # 99 % of gaps at 5 ms
    assert calibrate_slo_ms(gaps, 0.99, 1.2) == pytest.approx(6.0)
    gaps = [0.005] * 980 + [0.050] * 20
    assert calibrate_slo_ms(gaps, 0.99, 1.2) == pytest.approx(60.0)
    with pytest.raises(ValueError, match="no decode tokens"):
        calibrate_slo_ms([])


def test_phase_at() -> None:
    spec = default_spec(100.0)
    assert [phase_at(spec, t) for t in (0, 19.9, 20, 59.9, 60, 79.9, 80, 150)] == \
        ["quiet", "quiet", "busy", "busy", "bursty", "bursty", "quiet", "quiet"]


def test_steal_share_between_two_readings() -> None:
    assert steal_pct((100, 1000), (150, 2000)) == pytest.approx(5.0)
    assert steal_pct(None, (1, 2)) is None and steal_pct((1, 2), (1, 2)) is None
    now = cpu_times()  # Linux: a reading whose steal is part of the total
    assert now is None or 0 <= now[0] <= now[1]


def test_a_misspelt_policy_is_refused_before_the_bench_starts(
        capsys: pytest.CaptureFixture[str]) -> None:
    from harli.cli.main import main

    assert main(["bench", "--policies", "decode-only,harli:loose", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert "--policies" in err and "harli:loose" in err and "harli:strict" in err
    assert main(["bench", "--policies", "static:9"]) == 2
    assert "0..4" in capsys.readouterr().err


def test_a_negative_rate_scale_or_an_auto_slo_without_arrivals_is_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    from harli.cli.main import main

    assert main(["bench", "--rate-scale", "-1", "--slo", "9"]) == 2
    assert "--rate-scale must be >= 0" in capsys.readouterr().err
    assert main(["bench", "--rate-scale", "0"]) == 2  # --slo auto is the default
    assert "--slo auto" in capsys.readouterr().err


def test_an_adapter_share_outside_0_1_or_without_lora_serving_is_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    from harli.cli.main import main

    assert main(["bench", "--adapter-share", "1.5"]) == 2
    assert "--adapter-share must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert main(["bench", "--adapter-share", "0.5", "--set", "lora.enabled=false"]) == 2
    assert "--adapter-share needs LoRA serving on" in capsys.readouterr().err


def test_verdict_says_when_a_phase_lacks_blocks_for_a_ratio() -> None:
    res = _res(260)
    res["verdict"]["ratio"] = {"value": None, "lo": None, "hi": None}
    assert "there is no ratio to static:2: some load phase has no block" in verdict(res)


def test_the_predictor_line_says_what_harlis_predictor_stood_on() -> None:
    from harli.bench.bench import predictor_line

    fresh = {"predictor": {"mode": "online", "profile": None, "since_s": -9.6,
                           "online_refits": 3, "levels_learnt_s": {"1": -4.2, "2": 11.0}}}
    assert predictor_line(fresh) == (
        "harli's predictor: no profile, as a fresh daemon; stage 1 learnt online at -10 s "
        "from the first block (3 fits), each level's own slowdown at L1 at -4 s, L2 at +11 s")
    prior = {"predictor": {"mode": "online", "profile": None, "since_s": None}}
    assert "never left the conservative prior" in predictor_line(prior)
    assert predictor_line({"predictor": {"mode": "profile", "profile": "/p.json"}}) == \
        "harli's predictor: profile /p.json"


def test_a_bench_without_static_levels_says_so() -> None:
    blocks = [bl.Block(p, c, "busy", 0.0, 3.0, 100, 100, 0 if p == "decode-only" else 300)
              for c in range(4) for p in ("decode-only", "harli")]
    v = bl.verdict(blocks, {"busy": 1.0}, 0.99, resamples=100)
    text = verdict({"slo_ms": 6.0, "verdict": asdict(v), "host_steal_pct": 1.0})
    assert "no static level above 0 ran in this bench, so there is no ratio to report " \
        "(100 finetune tok/s)" in text
