"""Held-in evaluation of an adapter against its base model: mean response loss and
next-token accuracy on response tokens (teacher forcing), both on the same examples.

Used by the demo and the tests to show that a job learned its task; not a benchmark suite. The
scoring is ``validation.TokenScores``, the one a job's checkpoints are scored with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from harli.datasets import IGNORE_INDEX, load_dataset
from harli.finetune_proc.validation import TokenScores


@dataclass(frozen=True)
class EvalResult:
    examples: int
    base_loss: float
    adapter_loss: float
    base_accuracy: float
    adapter_accuracy: float


def _score(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    scores = TokenScores()
    for b in batches:
        scores.add(model, b)
    return scores.loss, scores.accuracy


def evaluate_adapter(model_dir: str | Path, adapter_dir: str | Path, dataset: str | Path,
                     max_seq_len: int = 256, limit: int = 64) -> EvalResult:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    examples, _ = load_dataset(dataset, tok, max_seq_len)
    examples = examples[:limit]
    pad = tok.pad_token_id or 0
    batches = []
    for i in range(0, len(examples), 16):
        chunk = examples[i:i + 16]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad)
        labels = torch.full((len(chunk), width), IGNORE_INDEX)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, e in enumerate(chunk):
            ids[j, :len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[j, :len(e.labels)] = torch.tensor(e.labels)
            mask[j, :len(e.input_ids)] = 1
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    base_loss, base_acc = _score(base, batches)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    loss, acc = _score(tuned, batches)
    return EvalResult(examples=len(examples), base_loss=base_loss, adapter_loss=loss,
                      base_accuracy=base_acc, adapter_accuracy=acc)
