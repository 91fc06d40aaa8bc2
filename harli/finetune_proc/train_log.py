"""What a job logs as it trains: its logged steps (every ``JobSpec.log_every`` optimizer steps,
and the last) and its checkpoints' validation scores.

Both are kept in HF Trainer's ``log_history`` shape in the ``TrainerState`` (so every checkpoint's
``trainer_state.json`` holds the history up to it, and a resume carries it on), and the recipe
hands each logged step to the process, which sends it to the daemon as a metric event.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from harli.finetune_proc.checkpoint import TrainerState
from harli.finetune_proc.validation import Score


@dataclass(frozen=True)
class StepLog:
    """One logged step (``harli.ipc.finetune.StepLogged`` without the job and the level)."""

    step: int
    epoch: float
    loss: float | None  # mean of the interval's micro-step losses; None: none had labels
    learning_rate: float
    grad_norm: float | None
    tokens: int  # trained so far
    tokens_per_s: float  # the interval's tokens over its training time


@dataclass
class LogInterval:
    """The micro-steps since the last logged step. Not checkpointed: after a resume the first
    interval starts at the checkpoint (the same one, when ``checkpoint_every`` is a multiple
    of ``log_every``)."""

    loss_sum: float = 0.0
    losses: int = 0  # micro-steps with a loss (some micro-batches have no label token)
    tokens: int = 0
    busy_s: float = 0.0

    def add(self, loss: float | None, tokens: int, busy_s: float) -> None:
        if loss is not None:
            self.loss_sum += loss
            self.losses += 1
        self.tokens += tokens
        self.busy_s += busy_s


def grad_norm(params: Iterable[torch.nn.Parameter]) -> float | None:
    """The L2 norm of the accumulated gradient (None: no parameter has one)."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params
             if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


def log_step(state: TrainerState, interval: LogInterval, epoch: float, learning_rate: float,
             norm: float | None) -> StepLog:
    """Close ``interval`` at ``state``'s step: append HF's train entry to the log history and
    return the step's log (the caller starts a new interval)."""
    loss = interval.loss_sum / interval.losses if interval.losses else None
    entry: dict[str, float | int] = {"step": state.step, "epoch": epoch,
                                     "learning_rate": learning_rate,
                                     "num_input_tokens_seen": state.tokens}
    if loss is not None:
        entry["loss"] = loss
    if norm is not None:
        entry["grad_norm"] = norm
    state.log_history.append(entry)
    return StepLog(step=state.step, epoch=epoch, loss=loss, learning_rate=learning_rate,
                   grad_norm=norm, tokens=state.tokens,
                   tokens_per_s=interval.tokens / interval.busy_s if interval.busy_s > 0 else 0.0)


def log_validation(state: TrainerState, score: Score, epoch: float, checkpoint: Path) -> None:
    """Append HF's eval entry for the checkpoint about to be written at ``state``'s step, and
    make it the best one if its loss is the lowest yet (HF's default for ``eval_loss``:
    lower is better)."""
    state.log_history.append({
        "step": state.step, "epoch": epoch, "eval_loss": score.loss,
        "eval_accuracy": score.accuracy, "eval_runtime": score.duration_s,
        "eval_samples_per_second": score.examples / score.duration_s if score.duration_s else 0.0,
    })
    if state.best_metric is None or score.loss < state.best_metric:
        state.best_metric = score.loss
        state.best_global_step = state.step
        state.best_model_checkpoint = str(checkpoint)
