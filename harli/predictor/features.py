"""What the predictor sees of a decode iteration: its batch shape and the feature vector.

The feature set lives only here (``FEATURE_NAMES`` and ``vector``), so it can change in one
place; fitted profiles record the names they were fit on and refuse to load when they differ.
Pure Python: ``vector`` runs on the daemon's hot path before every decode iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Scales put the coefficients in comparable ranges (seconds per seq, per 1k context tokens,
# per 1M prefill attention token-pairs), which keeps the least-squares problem well conditioned.
_CONTEXT_SCALE = 1e-3
_PREFILL_ATTN_SCALE = 1e-6

FEATURE_NAMES: tuple[str, ...] = (
    "intercept",
    "num_seqs",
    "decode_tokens",
    "prefill_tokens",
    "context_ktokens",
    "prefill_attn_mtokens",
    # A batch with any LoRA request runs vLLM's LoRA path for all of it (measured on CPU: one
    # adapter request makes the whole batch's iteration ~2.2x slower, the same with 1 or 4
    # distinct adapters): a fixed cost and a cost per token, both 0 in a base-only batch.
    "lora_batch",
    "lora_tokens",
)


@dataclass(frozen=True, slots=True)
class BatchShape:
    """One decode iteration's batch, as scheduled before it runs."""

    num_seqs: int
    decode_tokens: int
    prefill_tokens: int
    context_tokens: int  # sum over scheduled requests of tokens already in their KV cache
    # Sum over prefill requests of n_i * (c_i + n_i), with n_i this iteration's prefill tokens
    # and c_i the context before them: the quadratic attention work of prefill.
    prefill_attn_tokens: int = 0
    lora_requests: int = 0  # requests of the batch served with an adapter

    def __post_init__(self) -> None:
        if min(self.num_seqs, self.decode_tokens, self.prefill_tokens, self.context_tokens,
               self.prefill_attn_tokens, self.lora_requests) < 0:
            raise ValueError(f"batch shape counts must be >= 0, got {self}")

    @classmethod
    def from_telemetry(cls, t: Any) -> BatchShape:
        """Read a shape from any object with the telemetry attribute names (duck typing:
        ``IterationTelemetry``, a test fake, a row of a profiling log). ``num_running`` is the
        batch size; records older than ``prefill_attn_tokens`` or ``lora_requests`` count
        them as 0."""
        return cls(
            num_seqs=int(t.num_running),
            decode_tokens=int(t.decode_tokens),
            prefill_tokens=int(t.prefill_tokens),
            context_tokens=int(t.context_tokens),
            prefill_attn_tokens=int(getattr(t, "prefill_attn_tokens", 0)),
            lora_requests=int(getattr(t, "lora_requests", 0)),
        )


def vector(shape: BatchShape) -> tuple[float, ...]:
    """The feature vector of ``shape``, in the order of ``FEATURE_NAMES``."""
    lora = 1.0 if shape.lora_requests else 0.0
    return (
        1.0,
        float(shape.num_seqs),
        float(shape.decode_tokens),
        float(shape.prefill_tokens),
        shape.context_tokens * _CONTEXT_SCALE,
        shape.prefill_attn_tokens * _PREFILL_ATTN_SCALE,
        lora,
        lora * (shape.decode_tokens + shape.prefill_tokens),
    )


# Longest pause between two iterations that still counts as the engine running back to back
# (the decode loop between steps takes well under a millisecond; an idle engine waits 100 ms).
BACK_TO_BACK_S = 0.05


def token_latency_s(t: Any, prev: Any | None) -> float:
    """What iteration ``t`` cost each running request's next token: from the previous
    iteration's end when the engine ran back to back (so the decode loop's own work between
    steps, and any time the decode process lost its core to the finetune, count, as they do
    in TPOT), else the iteration's own duration. ``t`` and ``prev`` are telemetry records."""
    if (prev is not None and prev.incarnation == t.incarnation
            and prev.iteration == t.iteration - 1 and prev.num_running > 0
            and 0.0 <= t.start_s - prev.end_s < BACK_TO_BACK_S):
        return float(t.end_s - prev.end_s)
    return float(t.end_s - t.start_s)
