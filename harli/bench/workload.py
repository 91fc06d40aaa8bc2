"""Seeded inference workloads for ``harli bench``: Poisson arrivals whose rate changes by phase
(quiet, busy, bursty), prompt and output lengths from clipped log-normal distributions.

Pure and deterministic: the same spec and seed give the same requests, so every policy in one
bench run faces exactly the same load.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    rate_rps: float  # mean Poisson arrival rate

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.rate_rps < 0:
            raise ValueError(f"phase {self.name!r}: duration must be > 0 and rate >= 0")


@dataclass(frozen=True)
class LengthDist:
    """Log-normal with this median and sigma (of the log), clipped to ``[lo, hi]``."""

    median: int
    sigma: float
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.median <= self.hi or self.sigma < 0:
            raise ValueError(f"length distribution needs 1 <= lo <= median <= hi and "
                             f"sigma >= 0, got {self}")

    def sample(self, rng: random.Random) -> int:
        x = self.median * math.exp(rng.gauss(0.0, self.sigma))
        return min(self.hi, max(self.lo, round(x)))


@dataclass(frozen=True)
class Request:
    arrival_s: float  # from the start of the workload
    prompt_len: int
    output_len: int
    phase: str
    adapter: bool = False  # it names an adapter, not the base model


@dataclass(frozen=True)
class WorkloadSpec:
    phases: tuple[Phase, ...]
    prompt: LengthDist
    output: LengthDist
    seed: int = 0
    # When set, each phase's arrivals (times within the period and lengths) are drawn for one
    # period and repeated through the phase: common random numbers for the switchback bench,
    # whose blocks (one period each) then all face the same load within a cycle.
    period_s: float | None = None
    # The share of requests that name an adapter. Drawn from a stream of their own, so a
    # workload's arrivals and lengths are the same whatever the share.
    adapter_share: float = 0.0

    def __post_init__(self) -> None:
        if self.period_s is not None and not self.period_s > 0:
            raise ValueError(f"period_s must be > 0, got {self.period_s}")
        if not 0.0 <= self.adapter_share <= 1.0:
            raise ValueError(f"adapter_share must be in [0, 1], got {self.adapter_share}")

    @property
    def duration_s(self) -> float:
        return sum(p.duration_s for p in self.phases)


def generate(spec: WorkloadSpec) -> list[Request]:
    """The workload's requests in arrival order."""
    rng = random.Random(spec.seed)
    adapter_rng = random.Random(spec.seed + 1)
    out: list[Request] = []
    start = 0.0
    for ph in spec.phases:
        span = ph.duration_s if spec.period_s is None else min(spec.period_s, ph.duration_s)
        # (offset in the span, prompt, output, adapter)
        drawn: list[tuple[float, int, int, bool]] = []
        t = 0.0
        while ph.rate_rps > 0:
            t += rng.expovariate(ph.rate_rps)
            if t >= span:
                break
            drawn.append((t, spec.prompt.sample(rng), spec.output.sample(rng),
                          adapter_rng.random() < spec.adapter_share))
        repeats = max(1, math.ceil(ph.duration_s / span - 1e-9))
        for k in range(repeats):
            out.extend(Request(arrival_s=start + k * span + dt, prompt_len=p, output_len=o,
                               phase=ph.name, adapter=a)
                       for dt, p, o, a in drawn if k * span + dt < ph.duration_s)
        start += ph.duration_s
    return out


# Per workload kind: each phase's mean arrival rate (requests/s) and the prompt and output
# lengths. ``"decode"`` is what a decode instance of a prefill/decode-disaggregated service
# sees, the deployment Harli co-locates with: the prompt was prefilled elsewhere and its KV
# cache arrives, so a request costs the instance almost no prefill. We cannot ship KV between
# instances here; a short prompt stands in for it. ``"mixed"`` is a colocated prefill+decode
# server (longer prompts, chunked prefill in the decode iterations).
_KINDS: dict[str, tuple[dict[str, float], LengthDist, LengthDist]] = {
    "decode": ({"quiet": 0.3, "busy": 2.0, "bursty": 5.0},
               LengthDist(median=12, sigma=0.4, lo=4, hi=32),
               LengthDist(median=128, sigma=0.5, lo=32, hi=384)),
    "mixed": ({"quiet": 0.5, "busy": 4.0, "bursty": 10.0},
              LengthDist(median=64, sigma=0.8, lo=8, hi=512),
              LengthDist(median=64, sigma=0.6, lo=8, hi=256)),
}
WORKLOAD_KINDS = tuple(_KINDS)
# The load phases a switchback run's cycles take in turn.
CYCLE_PHASES = ("quiet", "busy", "bursty")


def _kind(kind: str) -> tuple[dict[str, float], LengthDist, LengthDist]:
    if kind not in _KINDS:
        raise ValueError(f"workload kind must be one of {', '.join(WORKLOAD_KINDS)}, got "
                         f"{kind!r}")
    return _KINDS[kind]


def default_spec(duration_s: float = 90.0, seed: int = 0, scale: float = 1.0,
                 kind: str = "decode", adapter_share: float = 0.0) -> WorkloadSpec:
    """Quiet, busy, bursty, quiet: a fifth, two fifths, a fifth, a fifth of the time.
    ``scale`` multiplies every rate (fit the load to the host); ``kind`` is one of
    ``WORKLOAD_KINDS`` (see ``_KINDS``); ``adapter_share`` of the requests name an adapter."""
    rates, prompt, output = _kind(kind)
    d = duration_s
    return WorkloadSpec(
        phases=tuple(Phase(name, share * d, rates[name] * scale) for name, share in
                     (("quiet", 0.2), ("busy", 0.4), ("bursty", 0.2), ("quiet", 0.2))),
        prompt=prompt, output=output, seed=seed, adapter_share=adapter_share)


def cycle_spec(cycle_s: float, cycles: int, seed: int = 0, scale: float = 1.0,
               kind: str = "decode", block_s: float | None = None,
               adapter_share: float = 0.0) -> WorkloadSpec:
    """One phase per cycle of ``cycle_s`` seconds, ``CYCLE_PHASES`` in turn: the switchback
    bench's workload. With ``block_s`` (a cycle's blocks' length) each cycle's arrivals are
    drawn for one block and repeated in every block of it, so that, past the first, every
    block of a cycle faces the same load (each cycle draws afresh)."""
    rates, prompt, output = _kind(kind)
    if cycles < 1 or not cycle_s > 0:
        raise ValueError(f"need cycles >= 1 and cycle_s > 0, got {cycles} and {cycle_s}")
    names = [CYCLE_PHASES[i % len(CYCLE_PHASES)] for i in range(cycles)]
    return WorkloadSpec(phases=tuple(Phase(n, cycle_s, rates[n] * scale) for n in names),
                        prompt=prompt, output=output, seed=seed, period_s=block_s,
                        adapter_share=adapter_share)
