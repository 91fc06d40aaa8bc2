"""The decode SLO and how its attainment is counted.

``SloTarget`` is what the operator asks for: a TPOT bound and the share of tokens (or
requests) that must meet it. ``SloCounter`` counts attainment from token timestamps two ways:
per token (share of inter-token gaps within the TPOT) and per request (share of finished
requests whose mean TPOT is within it). Pure logic: no clock, no IO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["SloCounter", "SloTarget"]


@dataclass(frozen=True, slots=True)
class SloTarget:
    tpot_ms: float = field(metadata={"help": "time per output token bound, in milliseconds"})
    attainment: float = field(default=0.99, metadata={
        "help": "share of tokens (or requests) that must meet tpot_ms, in (0, 1]"})

    def __post_init__(self) -> None:
        if not (self.tpot_ms > 0.0 and math.isfinite(self.tpot_ms)):
            raise ValueError(f"SloTarget.tpot_ms must be finite and > 0, got {self.tpot_ms}")
        if not 0.0 < self.attainment <= 1.0:
            raise ValueError(f"SloTarget.attainment must be in (0, 1], got {self.attainment}")

    @property
    def tpot_s(self) -> float:
        return self.tpot_ms / 1000.0


class SloCounter:
    """Running attainment counts against one ``SloTarget``. A gap (or a request's mean TPOT)
    equal to the bound meets it."""

    def __init__(self, slo: SloTarget) -> None:
        self._slo = slo
        self._tpot_s = slo.tpot_s
        self.tokens = 0  # inter-token gaps counted
        self.tokens_ok = 0  # of which within the TPOT
        self.requests = 0  # finished requests counted (>= 2 tokens)
        self.requests_ok = 0  # of which with mean TPOT within the bound
        self.requests_skipped = 0  # finished requests with < 2 tokens: no TPOT to judge

    @property
    def slo(self) -> SloTarget:
        return self._slo

    def on_token_gaps(self, gaps_s: list[float]) -> int:
        """Count inter-token gaps (seconds between consecutive tokens of one request); returns
        how many of them missed the TPOT."""
        tpot_s = self._tpot_s
        ok = 0
        for gap in gaps_s:
            if not (gap >= 0.0 and math.isfinite(gap)):
                raise ValueError(f"token gaps must be finite and >= 0, got {gap}")
            if gap <= tpot_s:
                ok += 1
        self.tokens += len(gaps_s)
        self.tokens_ok += ok
        return len(gaps_s) - ok

    def on_request(self, first_s: float, last_s: float, n_tokens: int) -> None:
        """Count a finished request from its first and last token times and its output token
        count; its mean TPOT is ``(last_s - first_s) / (n_tokens - 1)``."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        if n_tokens < 2:
            self.requests_skipped += 1
            return
        span_s = last_s - first_s
        if not (span_s >= 0.0 and math.isfinite(span_s)):
            raise ValueError(f"need finite first_s <= last_s, got {first_s} and {last_s}")
        self.requests += 1
        if span_s / (n_tokens - 1) <= self._tpot_s:
            self.requests_ok += 1

    def per_token(self) -> float | None:
        """Share of inter-token gaps within the TPOT; None before any gap."""
        return self.tokens_ok / self.tokens if self.tokens else None

    def per_request(self) -> float | None:
        """Share of counted requests with mean TPOT within the bound; None before any."""
        return self.requests_ok / self.requests if self.requests else None
