"""The bench's one-sentence verdict, from its own figures: the ratio to the best static level
meeting the target, and the host-drift caveat when the host's speed moved between rounds; and
its policy names, checked before any daemon starts."""

from __future__ import annotations

from typing import Any

import pytest

from harli.bench.bench import cpu_times, steal_pct, verdict


def _res(probes_ms: tuple[float, ...], best: str | None) -> dict[str, Any]:
    def pol(att: float, tok_s: float, ratio: float | None) -> dict[str, Any]:
        return {"attainment_token": att, "finetune_tok_s": tok_s, "ratio_to_best_static": ratio,
                "rounds": [{"host_probe_ms": p} for p in probes_ms]}

    return {"slo_ms": 6.0, "best_static": best,
            "policies": {"decode-only": pol(0.995, 0.0, None), "naive": pol(0.80, 3000.0, 1.5),
                         "static:2": pol(0.992, 2000.0, 1.0), "harli": pol(0.991, 2800.0, 1.4)}}


def test_verdict_gives_the_ratio_to_the_best_static_level() -> None:
    text = verdict(_res((10.0, 10.5), "static:2"))
    assert text.startswith("harli kept 99.1% of tokens within the 6.0 ms SLO")
    assert "1.40x the tokens/s of static:2" in text and "naive (always the top level): 80.0%" \
        in text
    assert "host" not in text  # 1.05x between rounds: no caveat


def test_verdict_says_when_no_static_level_met_the_target() -> None:
    assert "no static level met 99% per token" in verdict(_res((10.0,), None))


def test_verdict_names_the_hosts_drift_between_rounds() -> None:
    text = verdict(_res((10.0, 15.0, 12.0), "static:2"))
    assert "host's own speed moved 1.50x between rounds (probe 10.0-15.0 ms)" in text


def test_verdict_names_the_hypervisors_steal_only_when_it_is_material() -> None:
    res = _res((10.0, 10.5), "static:2")
    rounds = res["policies"]["harli"]["rounds"]
    rounds[0]["host_steal_pct"], rounds[1]["host_steal_pct"] = 1.0, 2.0
    assert "steal" not in verdict(res)  # a quiet VM
    rounds[1]["host_steal_pct"] = 37.0
    assert "the hypervisor took up to 37 % of this VM's CPU time in a turn" in verdict(res)


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
