"""The finetune job spec: what ``harli attach`` sends and the job store keeps.

A msgspec struct (map-encoded, unknown keys refused) so it is the same object on the wire, in
SQLite (as JSON) and in a user's TOML/JSON job file. Range checks live in the type annotations,
so a bad value is refused with the field's name (``Expected int >= 1 - at $.lora.r``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

# ``\Z``, not ``$``: msgspec matches with Python's ``re``, where ``$`` also matches before a
# trailing newline ("name\n" would pass).
JobName = Annotated[str, Meta(min_length=1, max_length=128,
                              pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")]

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"]


# Upper bounds for the integers of a job: an out-of-range value is an ``invalid`` reply that names
# the field at decode, never an overflow in the job store's SQLite (64-bit signed INTEGER) or in
# the trainer.
MAX_COUNT = 10**9
MAX_PRIORITY = 10**6


class LoraSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """PEFT ``LoraConfig`` fields a job may set."""

    r: Annotated[int, Meta(ge=1, le=1024)] = 8
    alpha: Annotated[int, Meta(ge=1, le=1_000_000)] = 16
    dropout: Annotated[float, Meta(ge=0, lt=1)] = 0.0
    target_modules: Annotated[list[str], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES))


class JobSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One LoRA finetune job. Steps are optimizer steps (``grad_accum`` micro-steps each)."""

    name: JobName
    dataset: Annotated[str, Meta(min_length=1)]
    # A JSONL file in one of the dataset formats, absolute; "" = none. At every checkpoint the
    # finetune scores the adapter on (up to the first 128 examples of) it: valid_loss and
    # next-token accuracy.
    validation_file: str = ""
    # Absolute; empty = the daemon's finetune.output_root / name. Must lie under one of the
    # daemon's output roots, and be new or empty.
    output_dir: str = ""
    # The model the job trains on; empty = the one being served. Any other model is refused:
    # the finetune shares the served model's weights.
    base_model: str = ""
    lora: LoraSettings = msgspec.field(default_factory=LoraSettings)
    learning_rate: Annotated[float, Meta(gt=0, le=1)] = 3e-3
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: Annotated[int, Meta(ge=0, le=MAX_COUNT)] = 0
    epochs: Annotated[int, Meta(ge=1, le=MAX_COUNT)] = 1
    max_steps: Annotated[int, Meta(ge=1, le=MAX_COUNT)] | None = None  # overrides epochs when set
    micro_batch_size: Annotated[int, Meta(ge=1, le=4096)] = 8
    grad_accum: Annotated[int, Meta(ge=1, le=4096)] = 1
    max_seq_len: Annotated[int, Meta(ge=8, le=MAX_COUNT)] = 256
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] = 0  # torch.manual_seed's range
    # Optimizer steps between two logged steps (metric events: loss, tokens/s, level); the
    # last step is always logged. HF's ``logging_steps``.
    log_every: Annotated[int, Meta(ge=1, le=MAX_COUNT)] = 1
    checkpoint_every: Annotated[int, Meta(ge=1, le=MAX_COUNT)] = 50
    keep_checkpoints: Annotated[int, Meta(ge=1, le=MAX_COUNT)] = 2
    # higher runs first; ties by arrival
    priority: Annotated[int, Meta(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] = 0
    # Register each checkpoint for serving as it is written, as ``NAME@step-N``, so the job's
    # progress can be tried while it trains (the finished adapter is always served as NAME).
    publish_checkpoints: bool = False
