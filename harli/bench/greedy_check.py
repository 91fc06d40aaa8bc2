"""Greedy outputs of the daemon against vLLM's offline ``LLM.generate``, told apart from
numerical ties.

Token-for-token equality is the check while the two agree. Where they part, the batch each
prompt ran in differs between the two paths (other requests, chunked prefill), and a float32
GEMM sums in another order at another batch size: two candidate tokens whose log-probabilities
are within that rounding may swap. vLLM's own model tests accept the same thing
(``check_logprobs_close``: at the first difference each side's token must be among the other's
top log-probs); this check is stricter, as a corrupted KV block would seldom land on a tie: at
the first difference the daemon's token must be within ``tie_nats`` of the offline argmax in the
offline log-probs of that very position (the prefixes are equal up to it). What follows a tie is
not compared, the two continuations being of different texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Offline top log-probs at one position: token id -> log-prob.
TopLogprobs = dict[int, float]


@dataclass(frozen=True)
class Divergence:
    prompt: int  # index into the prompts
    position: int  # first output position where the two differ
    ours: int
    reference: int
    gap_nats: float | None  # reference's log-prob minus ours; None: ours not in the top-k

    def describe(self) -> str:
        gap = ("not in the offline top log-probs" if self.gap_nats is None
               else f"{self.gap_nats:.2e} nats below the offline argmax")
        return (f"prompt {self.prompt}, output position {self.position}: token {self.ours} "
                f"against offline {self.reference} ({gap})")


@dataclass(frozen=True)
class GreedyComparison:
    prompts: int
    identical: int
    ties: list[Divergence] = field(default_factory=list)
    mismatches: list[Divergence] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        parts = [f"{self.identical}/{self.prompts} identical"]
        if self.ties:
            parts.append(f"{len(self.ties)} parted at a numerical tie")
        if self.mismatches:
            parts.append(f"{len(self.mismatches)} MISMATCHED: "
                         + "; ".join(d.describe() for d in self.mismatches))
        return ", ".join(parts)


def compare_greedy(ours: list[list[int]], reference: list[list[int]],
                   reference_logprobs: list[list[TopLogprobs]] | None,
                   tie_nats: float) -> GreedyComparison:
    """Compare per prompt (see the module docstring). ``reference_logprobs[i][j]``: the
    offline top log-probs at output position ``j`` of prompt ``i``; without them (None) any
    difference is a mismatch. Outputs of different lengths mismatch where the shorter ends."""
    if len(ours) != len(reference):
        raise ValueError(f"{len(ours)} outputs against {len(reference)} reference outputs")
    if tie_nats < 0:
        raise ValueError(f"tie_nats must be >= 0, got {tie_nats}")
    identical = 0
    ties: list[Divergence] = []
    mismatches: list[Divergence] = []
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        if a == b:
            identical += 1
            continue
        shorter = min(len(a), len(b))
        pos = next((j for j in range(shorter) if a[j] != b[j]), shorter)
        if pos == shorter:  # one is a prefix of the other
            mismatches.append(Divergence(i, pos, a[pos] if pos < len(a) else -1,
                                         b[pos] if pos < len(b) else -1, None))
            continue
        top = (reference_logprobs[i][pos] if reference_logprobs is not None
               and pos < len(reference_logprobs[i]) else {})
        gap = top[b[pos]] - top[a[pos]] if a[pos] in top and b[pos] in top else None
        d = Divergence(i, pos, a[pos], b[pos], gap)
        (ties if gap is not None and gap <= tie_nats else mismatches).append(d)
    return GreedyComparison(len(ours), identical, ties, mismatches)
