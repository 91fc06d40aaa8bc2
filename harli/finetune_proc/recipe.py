"""``LoRARecipe``: one LoRA finetune job, cut into micro-steps (torchtune's recipe shape:
``setup / train_micro_step / save_checkpoint / finish / cleanup``).

A micro-step is one micro-batch forward and backward; every ``grad_accum`` micro-steps the
optimizer steps. The data order of an epoch is a permutation seeded by ``(seed, epoch)``, so the
whole position in training follows from the micro-step count alone: a checkpoint (taken only at
optimizer-step boundaries) plus that count resumes exactly where training was.

Given an ``ActivationLease``, a micro-step keeps its saved activations in the arena pages the
daemon lent: the micro-batch is cut into chunks whose activations fit the lease, each chunk runs
forward and backward on its own, and the chunk losses are weighted so that the gradient is the
one of the whole micro-batch.

On a CUDA host the job trains on the GPU, and when the daemon relayed decode's weights
(``WeightsExported``) the base model is built on views of them (``shared_base``,
``shared_weights.build_shared_model``) instead of a second copy loaded from disk.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harli.arena.shm import ArenaError
from harli.arena.weights import WeightShareError, import_weights
from harli.datasets import IGNORE_INDEX, Example, load_dataset
from harli.finetune_proc.activations import ActivationLease, LeaseStats, combine_stats
from harli.finetune_proc.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_final_adapter,
)
from harli.finetune_proc.shared_weights import build_shared_model
from harli.ipc.jobs import JobSpec
from harli.ipc.weights import WeightExport, WeightsExported

logger = logging.getLogger(__name__)

LEASE_FILL = 0.9  # plan chunks to 90 % of the lease: alignment and estimate error take the rest


@dataclass(frozen=True)
class MicroStepResult:
    micro_step: int
    step: int
    epoch: int
    tokens: int
    step_tokens: int
    loss: float
    duration_s: float
    stepped: bool  # an optimizer step happened
    chunks: int = 1  # forward/backward passes the micro-batch was cut into
    lease: LeaseStats | None = None  # saved activations over all chunks; None without a lease
    waited_s: float = 0.0  # paused between chunks (left out of duration_s)


class MicroStepAborted(Exception):
    """Raised by a micro-step's ``between`` callback to abandon it (the job is cancelled or
    the process stops while paused mid-step): its chunks' gradients are incomplete, so the
    caller discards the accumulation, and a stopped job resumes from its last checkpoint."""


def chunk_plan(n_examples: int, padded_len: int, lease_bytes: int,
               bytes_per_token: float | None) -> int:
    """Examples per chunk so that a chunk's saved activations fit the lease.

    No lease means no limit (one chunk); no estimate yet means one example per chunk, which
    then measures the estimate for the next ones.
    """
    if lease_bytes <= 0:
        return n_examples
    if not bytes_per_token or bytes_per_token <= 0:
        return 1
    fit = math.floor(lease_bytes * LEASE_FILL / (bytes_per_token * padded_len))
    return max(1, min(n_examples, fit))


def chunk_weights(label_counts: list[int]) -> list[float]:
    """Weight of each chunk's mean loss so the weighted sum is the micro-batch's mean loss.

    HF's causal-LM loss is a mean over the label tokens left after shifting by one, so a chunk
    weighs its share of those tokens; a micro-batch without any gets all-zero weights.
    """
    total = sum(label_counts)
    return [c / total if total else 0.0 for c in label_counts]


def shifted_label_counts(labels: torch.Tensor) -> list[int]:
    """Per example, the label tokens the causal-LM loss averages over (shifted, not ignored)."""
    return [int(c) for c in (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)]


def shared_base(device: str, weights: WeightsExported | None,
                model_path: str) -> tuple[WeightExport, ...] | None:
    """The exports to build the base model on: decode's weights, when this process trains on
    CUDA and holds a non-empty export of the same model; None: load the model from disk (CPU
    hosts always: decode's weights there are not shared)."""
    if not device.startswith("cuda") or weights is None or not weights.exports:
        return None
    if weights.model != model_path:
        logger.warning("[finetune] decode exported %s, the job trains %s; loading a copy",
                       weights.model, model_path)
        return None
    return weights.exports


class LoRARecipe:
    def __init__(self, spec: JobSpec, model_path: str, device: str = "cpu",
                 shared: Sequence[WeightExport] | None = None) -> None:
        self.spec = spec
        self.model_path = model_path
        self.device = torch.device(device)
        self.shared = shared  # decode's weights to build the base model on (see shared_base)
        self.base_source = "disk"  # or "decode" once built on decode's weights
        self.output_dir = Path(spec.output_dir)
        self.state = TrainerState(step=0, micro_step=0, epoch=0, cursor=0, tokens=0, loss=None)
        self.resumed_from: int | None = None
        self._order: list[int] = []
        self._order_epoch = -1
        # Saved activation bytes per padded token, measured on the last chunk run in a lease;
        # it sizes the next chunks (None until a first pass has measured it).
        self.saved_bytes_per_token: float | None = None

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoTokenizer, get_scheduler

        spec = self.spec
        torch.manual_seed(spec.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.examples, self.report = load_dataset(spec.dataset, self.tokenizer, spec.max_seq_len)
        self.pad_id = self.tokenizer.pad_token_id or 0
        base = self._base_model()
        lora = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha,
                          lora_dropout=spec.lora.dropout,
                          target_modules=list(spec.lora.target_modules), task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lora)
        self.model.train()
        self.micro_batches_per_epoch = math.ceil(len(self.examples) / spec.micro_batch_size)
        self.total_steps = spec.max_steps or math.ceil(
            spec.epochs * self.micro_batches_per_epoch / spec.grad_accum)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=spec.learning_rate)
        self.scheduler = get_scheduler(spec.lr_schedule, self.optimizer,
                                       num_warmup_steps=spec.warmup_steps,
                                       num_training_steps=self.total_steps)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(self.output_dir)
        if ckpt is not None:
            self.state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
            self.resumed_from = self.state.step
            logger.info("[finetune] %s resumed from %s (step %d of %d)", spec.name, ckpt,
                        self.state.step, self.total_steps)

    def _base_model(self) -> torch.nn.Module:
        """Decode's weights when given (no copy: base parameters are frozen views of them, in
        decode's dtype), else the model loaded from disk in float32 onto the device."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.shared is not None:
            try:
                model = build_shared_model(AutoConfig.from_pretrained(self.model_path),
                                           import_weights(self.shared))
            except (WeightShareError, ArenaError) as e:
                logger.error("[finetune] %s: cannot build the model on decode's weights (%s); "
                             "loading a copy from %s", self.spec.name, e, self.model_path)
            else:
                self.base_source = "decode"
                logger.info("[finetune] %s: base model on decode's weights", self.spec.name)
                return model
        base: torch.nn.Module = AutoModelForCausalLM.from_pretrained(self.model_path,
                                                                     dtype=torch.float32)
        return base.to(self.device)

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps

    # -- training --------------------------------------------------------------------------------

    def _batch_indices(self, micro_step: int) -> list[int]:
        epoch, cursor = divmod(micro_step, self.micro_batches_per_epoch)
        if epoch != self._order_epoch:
            g = torch.Generator().manual_seed(self.spec.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=g).tolist()
            self._order_epoch = epoch
        mbs = self.spec.micro_batch_size
        return self._order[cursor * mbs:(cursor + 1) * mbs]

    def _collate(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        tensors = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        return {k: v.to(self.device) for k, v in tensors.items()}

    def train_micro_step(self, lease: ActivationLease | None = None,
                         between: Callable[[], float] | None = None,
                         chunk_tokens: int | Callable[[], int] = 0) -> MicroStepResult:
        """One micro-batch forward and backward (an optimizer step every ``grad_accum``).

        The micro-batch runs in chunks: as many examples as fit the lease's activation pages,
        and at most ``chunk_tokens`` padded tokens (0: no cap; a callable is asked before each
        chunk, so a level changed in ``between`` sizes the chunks after it). Between two chunks
        the lease is empty again and the gradient of every finished chunk is accumulated, so
        the caller's ``between`` may wait there (the daemon paused the finetune) or hand leased
        pages back; it returns the seconds it waited, which the micro-step's duration leaves
        out.
        ``MicroStepAborted`` raised from it abandons the micro-step."""
        spec = self.spec
        t0 = time.perf_counter()
        s = self.state
        batch = [self.examples[i] for i in self._batch_indices(s.micro_step)]
        inputs = self._collate(batch)
        loss, chunks, lease_stats, waited_s = self._forward_backward(inputs, lease, between,
                                                                     chunk_tokens)
        s.micro_step += 1
        s.epoch, s.cursor = divmod(s.micro_step, self.micro_batches_per_epoch)
        step_tokens = int(inputs["attention_mask"].sum())
        s.tokens += step_tokens
        if loss is not None:
            s.loss = loss
        stepped = s.micro_step % spec.grad_accum == 0
        if stepped:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            s.step += 1
        return MicroStepResult(micro_step=s.micro_step, step=s.step, epoch=s.epoch,
                               tokens=s.tokens, step_tokens=step_tokens,
                               loss=s.loss if s.loss is not None else float("nan"),
                               duration_s=time.perf_counter() - t0 - waited_s, stepped=stepped,
                               chunks=chunks, lease=lease_stats, waited_s=waited_s)

    def _forward_backward(self, inputs: dict[str, torch.Tensor], lease: ActivationLease | None,
                          between: Callable[[], float] | None,
                          chunk_tokens: int | Callable[[], int]
                          ) -> tuple[float | None, int, LeaseStats | None, float]:
        """Forward and backward of the micro-batch in chunks (see ``train_micro_step``).

        Returns the micro-batch's mean loss (None when it has no label tokens), the number of
        chunks run, their combined lease stats (None without a lease) and the seconds waited in
        ``between``. A micro-batch without label tokens still counts as a micro-step, but
        contributes no gradient.
        """
        n, width = inputs["input_ids"].shape
        counts = shifted_label_counts(inputs["labels"])
        weights = chunk_weights(counts)
        skip = [*self.model.parameters(), *self.model.buffers()] if lease is not None else []
        loss: float | None = None
        stats: list[LeaseStats] = []
        waited_s = 0.0
        chunks = 0
        start = 0
        while start < n:
            if start and between is not None:
                waited_s += between()
            # Re-planned after every chunk: the first pass of a job measures the estimate, the
            # lease may have shrunk or grown in ``between``, and the level may have changed
            # there (on CPU a chunk holds chunk_tokens per thread of the level).
            tokens = chunk_tokens if isinstance(chunk_tokens, int) else chunk_tokens()
            cap = max(1, tokens // width) if tokens > 0 else n
            lease_bytes = lease.lease_bytes if lease is not None else 0
            size = min(cap, chunk_plan(n - start, width, lease_bytes,
                                       self.saved_bytes_per_token))
            end = start + size
            w = sum(weights[start:end])
            if sum(counts[start:end]):  # no label tokens: no loss and no gradient to compute
                part = {k: v[start:end] for k, v in inputs.items()}
                # The lease is reset when the block ends: backward has consumed the chunk's
                # saved tensors by then, so the next chunk starts from an empty lease.
                with lease.micro_step(skip) if lease is not None else contextlib.nullcontext():
                    out = self.model(**part)
                    (out.loss * w / self.spec.grad_accum).backward()
                loss = (loss or 0.0) + float(out.loss.detach()) * w
                del out
                chunks += 1
                if lease is not None:
                    stats.append(lease.last_stats)
                    if lease.last_stats.saved_bytes:
                        self.saved_bytes_per_token = lease.last_stats.saved_bytes / (size * width)
            start = end
        if lease is None:
            return loss, max(1, chunks), None, waited_s
        combined = combine_stats(stats) if stats else LeaseStats(lease.lease_bytes, 0, 0, 0, 0, 0)
        return loss, max(1, chunks), combined, waited_s

    def checkpoint_due(self, result: MicroStepResult) -> bool:
        return result.stepped and (result.step % self.spec.checkpoint_every == 0 or self.done)

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.output_dir, self.model, self.optimizer, self.scheduler,
                               self.state, keep=self.spec.keep_checkpoints)

    def discard_partial_accumulation(self) -> None:
        """Drop gradients of an unfinished accumulation (on cancel): the next start resumes
        from the last checkpoint, which was taken at a step boundary."""
        self.optimizer.zero_grad(set_to_none=True)

    def finish(self) -> Path:
        return save_final_adapter(self.model, self.output_dir)

    def dataset_report(self) -> dict[str, Any]:
        r = self.report
        return {"path": r.path, "format": r.format, "records": r.records,
                "truncated": r.truncated, "tokens": r.tokens, "loss_tokens": r.loss_tokens}

    def cleanup(self) -> None:
        for name in ("model", "optimizer", "scheduler"):
            self.__dict__.pop(name, None)
