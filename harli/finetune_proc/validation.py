"""Scoring an adapter on held-out examples: mean token cross-entropy and next-token accuracy,
by teacher forcing, over the label tokens after the first (what the training loss averages).

Used at every checkpoint of a job that names a validation file (``LoRARecipe.validate``), and by
``evaluate.py``. At a checkpoint the scoring runs between two micro-steps, at the job's quota
level, so it is cut like a micro-step: batches of at most ``micro_batch_size`` examples and
``chunk_tokens`` padded tokens, with a yield between two, where the process obeys the daemon
(a pause, a lease change, a new level) as it does between two chunks of a micro-step. Nothing
is saved for backward (``torch.no_grad``), so the activation lease is never touched.

Only the first ``MAX_VALIDATION_EXAMPLES`` examples of the file are scored, the same ones at
every checkpoint, so that scores compare and a big file costs a checkpoint no more than about
``MAX_VALIDATION_EXAMPLES / micro_batch_size`` forward passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch

from harli.datasets import IGNORE_INDEX, Example

# Examples scored at each checkpoint (the first of the file). At micro_batch_size 8 that is 16
# forward passes without backward: about the work of five micro-steps.
MAX_VALIDATION_EXAMPLES = 128


@dataclass
class TokenScores:
    """Sums over scored label tokens; ``add`` one batch at a time."""

    loss_sum: float = 0.0  # cross-entropy, summed over tokens
    correct: int = 0  # tokens whose argmax prediction is the label
    tokens: int = 0

    def add(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Score one padded batch (``input_ids``, ``attention_mask``, ``labels``)."""
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            # Token i predicts token i + 1, as the causal-LM loss shifts them.
            labels = batch["labels"][:, 1:]
            mask = labels != IGNORE_INDEX
            scored = logits[:, :-1][mask].float()
            wanted = labels[mask]
            self.loss_sum += float(torch.nn.functional.cross_entropy(scored, wanted,
                                                                     reduction="sum"))
            self.correct += int((scored.argmax(-1) == wanted).sum())
            self.tokens += int(mask.sum())

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.tokens, 1)


@dataclass(frozen=True)
class Score:
    loss: float
    accuracy: float
    examples: int
    tokens: int
    duration_s: float  # scoring time; the caller's waits between batches are left out


def batch_sizes(examples: Sequence[Example], max_examples: int, chunk_tokens: int) -> list[int]:
    """How many examples each batch takes, in order: at most ``max_examples``, and at most
    ``chunk_tokens`` padded tokens (0: no cap; a batch holds one example at least)."""
    sizes = []
    start = 0
    while start < len(examples):
        n = 1
        width = len(examples[start].input_ids)
        while n < max_examples and start + n < len(examples):
            wider = max(width, len(examples[start + n].input_ids))
            if chunk_tokens and wider * (n + 1) > chunk_tokens:
                break
            width, n = wider, n + 1
        sizes.append(n)
        start += n
    return sizes


def score_examples(model: torch.nn.Module, examples: Sequence[Example],
                   collate: Callable[[list[Example]], dict[str, torch.Tensor]],
                   max_examples: int, chunk_tokens: int = 0) -> Generator[None, None, Score]:
    """Score ``examples`` in batches (``batch_sizes``), yielding between two; returns the
    score. The model is in eval mode while it runs (no dropout) and back in train mode after,
    also when the caller closes it early."""
    scores = TokenScores()
    busy_s = 0.0
    start = 0
    model.eval()
    try:
        for i, n in enumerate(batch_sizes(examples, max_examples, chunk_tokens)):
            if i:
                yield
            t0 = time.perf_counter()
            scores.add(model, collate(list(examples[start:start + n])))
            busy_s += time.perf_counter() - t0
            start += n
    finally:
        model.train()
    return Score(loss=scores.loss, accuracy=scores.accuracy, examples=len(examples),
                 tokens=scores.tokens, duration_s=busy_s)
