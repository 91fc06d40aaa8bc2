"""``LoRARecipe``: one LoRA finetune job, cut into micro-steps (torchtune's recipe shape:
``setup / micro_step / save_checkpoint / finish / cleanup``).

A micro-step is one micro-batch forward and backward; every ``grad_accum`` micro-steps the
optimizer steps. The data order of an epoch is a permutation seeded by ``(seed, epoch)``, so the
whole position in training follows from the micro-step count alone: a checkpoint (taken only at
optimizer-step boundaries) plus that count resumes exactly where training was.

A micro-step runs in chunks: as many examples as ``chunk_tokens`` allows and, given an
``ActivationLease``, as fit the arena pages the daemon lent for the saved activations. Each
chunk runs forward and backward on its own, and the chunk losses are weighted so that the
gradient is the one of the whole micro-batch. ``MicroStep`` yields between two chunks and
never calls its caller: the process decides there, between two iterations, whether to go on.

On a CUDA host the job trains on the GPU, and when the daemon relayed decode's weights
(``WeightsExported``) the base model is built on views of them (``shared_base``,
``shared_weights.build_shared_model``) instead of a second copy loaded from disk.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from harli.arena.shm import ArenaError
from harli.arena.weights import WeightShareError, import_weights
from harli.datasets import IGNORE_INDEX, DatasetReport, Example, TokenizedCache, load_dataset
from harli.finetune_proc.activations import ActivationLease, LeaseStats, combine_stats
from harli.finetune_proc.checkpoint import (
    CHECKPOINT_PREFIX,
    RunPlan,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_final_adapter,
)
from harli.finetune_proc.shared_weights import build_shared_model
from harli.finetune_proc.train_log import (
    LogInterval,
    StepLog,
    grad_norm,
    log_step,
    log_validation,
)
from harli.finetune_proc.validation import MAX_VALIDATION_EXAMPLES, score_examples
from harli.ipc.finetune import ValidationScore
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
    duration_s: float  # training time: the caller's waits between chunks are left out
    stepped: bool  # an optimizer step happened
    chunks: int = 1  # forward/backward passes the micro-batch was cut into
    lease: LeaseStats | None = None  # saved activations over all chunks; None without a lease
    waited_s: float = 0.0  # the caller's waits between chunks (``MicroStep.waited_s``)
    logged: StepLog | None = None  # a logged step ended with this micro-step


class MicroStep:
    """One micro-step in flight, made by ``LoRARecipe.micro_step``; iterate it once.

    Iterating runs the micro-batch's chunks and yields at each boundary between two, where the
    lease is empty again and the gradient of every finished chunk is accumulated. Between two
    iterations the caller may change the lease (grant or take back pages), set the next
    chunk's ``chunk_tokens``, wait (adding the seconds to ``waited_s``, which ``duration_s``
    leaves out), or stop iterating and ``close()`` it, which abandons the micro-step: its
    chunks' gradients are incomplete, so the caller discards the accumulation
    (``LoRARecipe.discard_partial_accumulation``), and the trainer's position stays where it
    was. When the iteration runs to its end, ``result`` holds the micro-step's result.
    """

    def __init__(self, recipe: LoRARecipe, lease: ActivationLease | None,
                 chunk_tokens: int) -> None:
        self.chunk_tokens = chunk_tokens  # cap on the next chunk's padded tokens (0: none)
        self.waited_s = 0.0
        self.result: MicroStepResult | None = None
        self._chunks = recipe._run_micro_step(self, lease)  # runs nothing until iterated

    def __iter__(self) -> Iterator[None]:
        self.result = yield from self._chunks

    def close(self) -> None:
        """Abandon the micro-step at the boundary it stopped at (nothing if it finished)."""
        self._chunks.close()


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
                 shared: Sequence[WeightExport] | None = None,
                 dataset_cache: TokenizedCache | None = None) -> None:
        self.spec = spec
        self.dataset_cache = dataset_cache  # where the daemon left the tokenized dataset
        self.model_path = model_path
        self.device = torch.device(device)
        self.shared = shared  # decode's weights to build the base model on (see shared_base)
        self.base_source = "disk"  # or "decode" once built on decode's weights
        self.output_dir = Path(spec.output_dir)
        self.state = TrainerState(step=0, micro_step=0, epoch=0, cursor=0, tokens=0, loss=None)
        self.resumed_from: int | None = None
        self.validation_examples: list[Example] = []  # the first of the validation file
        self.validation_report: DatasetReport | None = None
        self._interval = LogInterval()
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
        self.examples, self.report = load_dataset(spec.dataset, self.tokenizer, spec.max_seq_len,
                                                  self.dataset_cache)
        if self.dataset_cache is not None and self.report.source != "cache":
            logger.warning("[finetune] %s: %s was not in the tokenized cache (changed since "
                           "attach, or the entry is gone); tokenized it again", spec.name,
                           spec.dataset)
        if spec.validation_file:
            examples, self.validation_report = load_dataset(
                spec.validation_file, self.tokenizer, spec.max_seq_len, self.dataset_cache)
            self.validation_examples = list(examples[:MAX_VALIDATION_EXAMPLES])
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
        self.plan = RunPlan(
            max_steps=self.total_steps,
            num_train_epochs=math.ceil(self.total_steps * spec.grad_accum /
                                       self.micro_batches_per_epoch),
            logging_steps=spec.log_every, eval_steps=spec.checkpoint_every,
            save_steps=spec.checkpoint_every, train_batch_size=spec.micro_batch_size,
            micro_batches_per_epoch=self.micro_batches_per_epoch)
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

    def micro_step(self, lease: ActivationLease | None = None,
                   chunk_tokens: int = 0) -> MicroStep:
        """The next micro-step, to iterate (``MicroStep``). Its chunks hold as many examples
        as fit ``lease``'s pages and at most ``chunk_tokens`` padded tokens (0: no cap; the
        caller may change it between chunks)."""
        return MicroStep(self, lease, chunk_tokens)

    def train_micro_step(self, lease: ActivationLease | None = None,
                         chunk_tokens: int = 0) -> MicroStepResult:
        """The next micro-step, run to its end without stopping between chunks."""
        step = self.micro_step(lease, chunk_tokens)
        for _ in step:
            pass
        assert step.result is not None  # the iteration ran to its end
        return step.result

    def _run_micro_step(self, step: MicroStep, lease: ActivationLease | None
                        ) -> Generator[None, None, MicroStepResult]:
        """``MicroStep``'s iteration: the chunks, then the trainer's position and, every
        ``grad_accum`` micro-steps, the optimizer step. Abandoned at a boundary, it leaves the
        position as it was."""
        spec = self.spec
        t0 = time.perf_counter()
        s = self.state
        batch = [self.examples[i] for i in self._batch_indices(s.micro_step)]
        inputs = self._collate(batch)
        loss, chunks, lease_stats = yield from self._forward_backward(inputs, lease, step)
        s.micro_step += 1
        s.epoch, s.cursor = divmod(s.micro_step, self.micro_batches_per_epoch)
        step_tokens = int(inputs["attention_mask"].sum())
        s.tokens += step_tokens
        if loss is not None:
            s.loss = loss
        stepped = s.micro_step % spec.grad_accum == 0
        logged: StepLog | None = None
        if stepped:
            learning_rate = float(self.scheduler.get_last_lr()[0])  # the rate this step uses
            norm = grad_norm(self.model.parameters()) if self._logs_next_step() else None
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            s.step += 1
        duration_s = time.perf_counter() - t0 - step.waited_s
        self._interval.add(loss, step_tokens, duration_s)
        if stepped and self._logs_next_step(done=s.step):
            logged = log_step(s, self._interval, self.epoch_progress, learning_rate, norm)
            self._interval = LogInterval()
        return MicroStepResult(micro_step=s.micro_step, step=s.step, epoch=s.epoch,
                               tokens=s.tokens, step_tokens=step_tokens,
                               loss=s.loss if s.loss is not None else float("nan"),
                               duration_s=duration_s, stepped=stepped, chunks=chunks,
                               lease=lease_stats, waited_s=step.waited_s, logged=logged)

    def _logs_next_step(self, done: int | None = None) -> bool:
        """Whether the optimizer step that ends at ``done`` steps (default: the one under way)
        is a logged step: every ``log_every``-th, and the last."""
        step = self.state.step + 1 if done is None else done
        return step % self.spec.log_every == 0 or step >= self.total_steps

    @property
    def epoch_progress(self) -> float:
        """The fractional epoch, as HF's Trainer counts it."""
        return self.state.epoch_progress(self.micro_batches_per_epoch)

    def _forward_backward(self, inputs: dict[str, torch.Tensor], lease: ActivationLease | None,
                          step: MicroStep
                          ) -> Generator[None, None, tuple[float | None, int, LeaseStats | None]]:
        """Forward and backward of the micro-batch in chunks, yielding between two.

        Returns the micro-batch's mean loss (None when it has no label tokens), the number of
        chunks run and their combined lease stats (None without a lease). A micro-batch
        without label tokens still counts as a micro-step, but contributes no gradient.
        """
        n, width = inputs["input_ids"].shape
        counts = shifted_label_counts(inputs["labels"])
        weights = chunk_weights(counts)
        skip = [*self.model.parameters(), *self.model.buffers()] if lease is not None else []
        loss: float | None = None
        stats: list[LeaseStats] = []
        chunks = 0
        start = 0
        while start < n:
            if start:
                yield  # a boundary: the lease is empty, the finished chunks' gradients summed
            # Planned before every chunk: the first pass of a job measures the estimate, and
            # at a boundary the lease may have shrunk or grown and the level, which sizes
            # ``chunk_tokens`` (on CPU: per thread of the level), may have changed.
            tokens = step.chunk_tokens
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
            return loss, max(1, chunks), None
        combined = combine_stats(stats) if stats else LeaseStats(lease.lease_bytes, 0, 0, 0, 0, 0)
        return loss, max(1, chunks), combined

    def checkpoint_due(self, result: MicroStepResult) -> bool:
        return result.stepped and (result.step % self.spec.checkpoint_every == 0 or self.done)

    @property
    def at_step_boundary(self) -> bool:
        """No gradient accumulation under way: the state is one a checkpoint can hold."""
        return self.state.micro_step % self.spec.grad_accum == 0

    def has_checkpoint(self, step: int) -> bool:
        return (self.output_dir / f"{CHECKPOINT_PREFIX}{step}").is_dir()

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.output_dir, self.model, self.optimizer, self.scheduler,
                               self.state, keep=self.spec.keep_checkpoints, plan=self.plan)

    @property
    def validates(self) -> bool:
        """Whether the job's checkpoints are scored on a validation file."""
        return bool(self.validation_examples)

    def validate(self, chunk_tokens: int = 0) -> Generator[None, None, ValidationScore]:
        """Score the adapter as it is now on the validation examples, yielding between two
        batches (of at most ``micro_batch_size`` examples and ``chunk_tokens`` padded tokens);
        the score goes into the log history, for the checkpoint written next."""
        score = yield from score_examples(self.model, self.validation_examples, self._collate,
                                          self.spec.micro_batch_size, chunk_tokens)
        log_validation(self.state, score, self.epoch_progress,
                       self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.step}")
        return ValidationScore(loss=score.loss, accuracy=score.accuracy,
                               examples=score.examples, tokens=score.tokens,
                               duration_s=score.duration_s)

    def discard_partial_accumulation(self) -> None:
        """Drop the gradients of an unfinished accumulation (a cancel, an abandoned
        micro-step): a job started again resumes from its last checkpoint, which was taken at
        a step boundary."""
        self.optimizer.zero_grad(set_to_none=True)

    def finish(self) -> Path:
        return save_final_adapter(self.model, self.output_dir)

    def dataset_report(self) -> dict[str, int | str]:
        """The training set's report, and the validation file's with ``validation_`` keys (as
        the daemon's attach check reports them)."""
        report = self.report.as_dict()
        if self.validation_report is not None:
            report.update({f"validation_{k}": v
                           for k, v in self.validation_report.as_dict().items()})
        return report

    def cleanup(self) -> None:
        for name in ("model", "optimizer", "scheduler"):
            self.__dict__.pop(name, None)
