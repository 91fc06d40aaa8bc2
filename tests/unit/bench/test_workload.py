"""The bench's seeded workloads: deterministic, phased, lengths inside their bounds."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harli.bench.workload import (
    CYCLE_PHASES,
    WORKLOAD_KINDS,
    LengthDist,
    Phase,
    WorkloadSpec,
    cycle_spec,
    default_spec,
    generate,
)


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_same_spec_and_seed_give_the_same_requests(kind: str) -> None:
    assert generate(default_spec(30, 3, 1.0, kind)) == generate(default_spec(30, 3, 1.0, kind))
    assert generate(default_spec(30, 3, 1.0, kind)) != generate(default_spec(30, 4, 1.0, kind))


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_arrivals_are_ordered_inside_the_run_and_busier_phases_are_denser(kind: str) -> None:
    spec = default_spec(600, 0, 1.0, kind)
    reqs = generate(spec)
    times = [r.arrival_s for r in reqs]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < spec.duration_s
    per_s = {}
    for ph in spec.phases:
        n = sum(1 for r in reqs if r.phase == ph.name)
        per_s[ph.name] = n / sum(p.duration_s for p in spec.phases if p.name == ph.name)
    assert per_s["quiet"] < per_s["busy"] < per_s["bursty"]
    # Poisson counts over minutes land near the configured rate.
    busy = next(p for p in spec.phases if p.name == "busy")
    assert per_s["busy"] == pytest.approx(busy.rate_rps, rel=0.15)


def test_a_decode_instance_sees_short_prompts_and_long_outputs() -> None:
    dec = generate(default_spec(300, 0, 1.0, "decode"))
    mixed = generate(default_spec(300, 0, 1.0, "mixed"))
    assert max(r.prompt_len for r in dec) <= 32 < max(r.prompt_len for r in mixed)
    assert sorted(r.output_len for r in dec)[len(dec) // 2] > \
        sorted(r.output_len for r in mixed)[len(mixed) // 2]


def test_rate_scale_multiplies_every_phase_and_bad_kinds_are_named() -> None:
    a, b = default_spec(60, 0, 1.0), default_spec(60, 0, 2.0)
    assert [2 * p.rate_rps for p in a.phases] == [p.rate_rps for p in b.phases]
    with pytest.raises(ValueError, match="decode, mixed"):
        default_spec(60, 0, 1.0, "prefill")


@given(st.integers(1, 300), st.floats(0, 2), st.integers(0, 2**32))
def test_lengths_stay_inside_their_bounds(median: int, sigma: float, seed: int) -> None:
    d = LengthDist(median=median, sigma=sigma, lo=1, hi=2 * median)
    rng = random.Random(seed)
    assert all(1 <= d.sample(rng) <= 2 * median for _ in range(50))


def test_bad_phases_and_distributions_are_refused() -> None:
    with pytest.raises(ValueError, match="phase 'x'"):
        Phase("x", 0.0, 1.0)
    with pytest.raises(ValueError, match="lo <= median <= hi"):
        LengthDist(median=10, sigma=0.1, lo=20, hi=30)
    empty = WorkloadSpec(phases=(Phase("idle", 5.0, 0.0),), prompt=LengthDist(8, 0, 8, 8),
                         output=LengthDist(8, 0, 8, 8))
    assert generate(empty) == []


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_a_switchback_workload_holds_one_phase_per_cycle_in_turn(kind: str) -> None:
    spec = cycle_spec(12.0, 7, 5, 1.0, kind)
    assert [p.name for p in spec.phases] == [CYCLE_PHASES[i % 3] for i in range(7)]
    assert all(p.duration_s == 12.0 for p in spec.phases) and spec.duration_s == 84.0
    rates = {p.name: p.rate_rps for p in default_spec(60, 0, 1.0, kind).phases}
    assert all(p.rate_rps == rates[p.name] for p in spec.phases)  # the same loads
    for r in generate(spec):  # each request in its cycle's phase
        assert r.phase == CYCLE_PHASES[int(r.arrival_s // 12.0) % 3]
    with pytest.raises(ValueError, match="cycles >= 1"):
        cycle_spec(12.0, 0)


def test_with_a_block_length_every_block_of_a_cycle_gets_the_same_arrivals() -> None:
    spec = cycle_spec(6.0, 6, 2, 1.0, "decode", block_s=1.5)  # 4 blocks a cycle
    reqs = generate(spec)
    assert generate(spec) == reqs  # still seeded
    for c in range(6):
        blocks = [[(round(r.arrival_s - 6.0 * c - 1.5 * k, 9), r.prompt_len, r.output_len)
                   for r in reqs if 6.0 * c + 1.5 * k <= r.arrival_s < 6.0 * c + 1.5 * (k + 1)]
                  for k in range(4)]
        assert all(b == blocks[0] for b in blocks)
        assert all(r.phase == CYCLE_PHASES[c % 3] for r in reqs
                   if 6.0 * c <= r.arrival_s < 6.0 * (c + 1))
    # Each cycle draws afresh, and the rates hold over many cycles.
    busy = [generate(cycle_spec(6.0, 3, s, 1.0, "decode", block_s=1.5)) for s in range(200)]
    per_s = sum(sum(1 for r in rs if r.phase == "busy") for rs in busy) / (200 * 6.0)
    assert per_s == pytest.approx(2.0, rel=0.1)
    with pytest.raises(ValueError, match="period_s must be > 0"):
        cycle_spec(6.0, 3, block_s=0.0)


def test_the_lora_benchs_mixes_name_each_requests_model() -> None:
    from harli.bench.lora import MIXES, models_of

    ads = ["a", "b", "c", "d"]
    assert models_of("base", 3, ads) == [None] * 3
    assert models_of("1 adapter", 3, ads) == ["a"] * 3
    assert models_of("4 adapters", 6, ads) == ["a", "b", "c", "d", "a", "b"]
    assert models_of("half base", 8, ads) == [None, "a", None, "b", None, "c", None, "d"]
    assert len(MIXES) == 4
    with pytest.raises(ValueError, match="unknown mix"):
        models_of("all", 2, ads)


def test_adapter_share_marks_that_share_and_leaves_the_load_unchanged() -> None:
    base = generate(cycle_spec(6.0, 30, 4, 1.0, "decode", block_s=1.5))
    half = generate(cycle_spec(6.0, 30, 4, 1.0, "decode", block_s=1.5, adapter_share=0.5))
    # Same arrivals and lengths: the share is drawn from a stream of its own.
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in half] == \
        [(r.arrival_s, r.prompt_len, r.output_len) for r in base]
    assert not any(r.adapter for r in base)
    # Drawn per block's arrivals, so each block of a cycle repeats the same adapter requests.
    drawn = [r for r in half if r.arrival_s < 1.5]
    again = [r for r in half if 1.5 <= r.arrival_s < 3.0]
    assert [r.adapter for r in drawn] == [r.adapter for r in again]
    assert 0.4 < sum(r.adapter for r in half) / len(half) < 0.6
    every = generate(default_spec(30.0, 1, adapter_share=1.0))
    assert every and all(r.adapter for r in every)
    with pytest.raises(ValueError, match=r"adapter_share must be in \[0, 1\]"):
        default_spec(10.0, adapter_share=1.5)
