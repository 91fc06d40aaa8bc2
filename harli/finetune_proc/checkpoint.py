"""Crash-safe checkpoints for the finetune process.

The trainer may be SIGKILLed at any moment (the daemon's stop ladder, the OOM killer, a power
cut) and must resume from its last checkpoint without counting a step twice. Checkpoints are
HF-Trainer-style folders ``checkpoint-N/`` (N = optimizer steps done) inside the job's output
dir, each holding the LoRA adapter (``adapter_model.safetensors`` + ``adapter_config.json``),
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` and ``trainer_state.json``.

A checkpoint is built in a ``.tmp-checkpoint-*`` folder, ``trainer_state.json`` is written last
as the completeness marker, every file and the folder are fsynced, and only then is the folder
renamed to ``checkpoint-N``; so a ``checkpoint-N`` with a readable ``trainer_state.json`` is
always whole, and anything else left behind by a crash is ignored and later pruned.

``trainer_state.json`` follows the schema of HF Trainer's ``TrainerState`` (``global_step``,
``epoch``, ``log_history``, ``best_metric``, ...), so ``TrainerState.load_from_json`` and the
tools built on it read it. That loader passes every top-level key to the dataclass and refuses
any other, so what harli needs beyond HF's fields to resume exactly (micro-step, data cursor,
...) goes where HF keeps the state of the callbacks of a run: ``stateful_callbacks``, under
``HarliResumeState`` (HF's Trainer, resuming from it, ignores an entry it has no callback for,
with a warning). A checkpoint of the older flat format (``{"format": 1, "step": ...}``) is still
read for a resume.

Everything is loaded with ``torch.load(..., weights_only=True)``: the RNG states are stored as
plain Python values and tensors (numpy's key array as a tensor) so no pickled objects are needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
TMP_ADAPTER_PREFIX = ".tmp-adapter-"
ADAPTER_DIR = "adapter"
# Harli's resume state inside trainer_state.json: 2 = HF's schema with it in
# ``stateful_callbacks[HARLI_STATE_KEY]``; 1 = the older flat format, still read.
STATE_FORMAT = 2
LEGACY_STATE_FORMAT = 1
HARLI_STATE_KEY = "HarliResumeState"
ADAPTER_NAME = "default"

ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pth"
STATE_FILE = "trainer_state.json"

_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


@dataclass(frozen=True)
class RunPlan:
    """What ``trainer_state.json`` says of the run besides where it stands: HF's fields, from
    the job spec (the same at every checkpoint of a job)."""

    max_steps: int
    num_train_epochs: int
    logging_steps: int
    eval_steps: int  # evaluation runs at checkpoints (when the job has a validation file)
    save_steps: int
    train_batch_size: int  # micro_batch_size: the examples of one forward pass
    micro_batches_per_epoch: int  # to write the fractional epoch


@dataclass
class TrainerState:
    """Where training stands; saved as ``trainer_state.json`` in every checkpoint."""

    step: int  # optimizer steps done
    micro_step: int  # micro-steps done in total
    epoch: int
    cursor: int  # index of the next micro-batch within the epoch's order
    tokens: int  # tokens trained on
    loss: float | None  # last logged loss
    # HF's: one dict per logged step ("loss", "learning_rate", ...) and per evaluation
    # ("eval_loss", "eval_accuracy", ...), each with its "step" and "epoch".
    log_history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None  # the lowest eval_loss so far
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None  # may since have been pruned (keep_checkpoints)

    def epoch_progress(self, micro_batches_per_epoch: int) -> float:
        """The fractional epoch, as HF counts it: micro-steps done over those of an epoch."""
        return self.micro_step / max(1, micro_batches_per_epoch)

    def to_json(self, plan: RunPlan) -> dict[str, Any]:
        """``trainer_state.json``'s content: HF ``TrainerState``'s fields, harli's own in
        ``stateful_callbacks``."""
        return {
            "epoch": self.epoch_progress(plan.micro_batches_per_epoch),
            "global_step": self.step,
            "max_steps": plan.max_steps,
            "logging_steps": plan.logging_steps,
            "eval_steps": plan.eval_steps,
            "save_steps": plan.save_steps,
            "train_batch_size": plan.train_batch_size,
            "num_train_epochs": plan.num_train_epochs,
            "num_input_tokens_seen": self.tokens,
            "total_flos": 0.0,  # not counted
            "log_history": self.log_history,
            "best_metric": self.best_metric,
            "best_global_step": self.best_global_step,
            "best_model_checkpoint": self.best_model_checkpoint,
            "is_local_process_zero": True,
            "is_world_process_zero": True,
            "is_hyper_param_search": False,
            "trial_name": None,
            "trial_params": None,
            # HF's shape for a callback's state: constructor args, then attributes to set.
            "stateful_callbacks": {HARLI_STATE_KEY: {"args": {}, "attributes": {
                "format": STATE_FORMAT, "micro_step": self.micro_step, "epoch": self.epoch,
                "cursor": self.cursor, "loss": self.loss}}},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainerState:
        """Read either format (``state_format`` says which; raise ValueError for neither)."""
        fmt = state_format(d)
        if fmt == LEGACY_STATE_FORMAT:
            return cls(step=int(d["step"]), micro_step=int(d["micro_step"]),
                       epoch=int(d["epoch"]), cursor=int(d["cursor"]), tokens=int(d["tokens"]),
                       loss=_float_or_none(d.get("loss")))
        if fmt != STATE_FORMAT:
            raise ValueError("not a trainer state harli wrote")
        own = d["stateful_callbacks"][HARLI_STATE_KEY]["attributes"]
        best_step = d.get("best_global_step")
        return cls(step=int(d["global_step"]), micro_step=int(own["micro_step"]),
                   epoch=int(own["epoch"]), cursor=int(own["cursor"]),
                   tokens=int(d["num_input_tokens_seen"]), loss=_float_or_none(own.get("loss")),
                   log_history=list(d.get("log_history") or []),
                   best_metric=_float_or_none(d.get("best_metric")),
                   best_global_step=None if best_step is None else int(best_step),
                   best_model_checkpoint=d.get("best_model_checkpoint"))


def _float_or_none(x: Any) -> float | None:
    return None if x is None else float(x)


def state_format(d: Any) -> int | None:
    """The format of a parsed ``trainer_state.json`` harli wrote (2, or 1 for the older flat
    one), or None: not one of harli's (another trainer's, or damaged)."""
    if not isinstance(d, dict):
        return None
    if d.get("format") == LEGACY_STATE_FORMAT:
        return LEGACY_STATE_FORMAT
    callbacks = d.get("stateful_callbacks")
    own = callbacks.get(HARLI_STATE_KEY) if isinstance(callbacks, dict) else None
    attributes = own.get("attributes") if isinstance(own, dict) else None
    if isinstance(attributes, dict) and attributes.get("format") == STATE_FORMAT:
        return STATE_FORMAT
    return None


# --- filesystem helpers ---------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories are opened read-only, which Linux allows)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first."""
    dirs: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirs.append(d)
        for name in filenames:
            _fsync_path(d / name)
    for d in reversed(dirs):
        _fsync_path(d)


def _make_tmp_dir(parent: Path, prefix: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; checkpoints are readable like the model
    return tmp


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``.

    Returns False where that is not available (other OS, old libc, a filesystem without it), so
    the caller falls back to rename-aside; raises on any other error.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _install_dir(tmp: Path, final: Path, aside_prefix: str) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing an existing ``final``.

    An existing ``final`` is swapped out atomically where the OS can (``final`` is then never
    missing); otherwise it is renamed aside (to a name starting with ``aside_prefix``, which the
    pruning removes), ``tmp`` is renamed in and the old one deleted. Ends with an fsync of the
    parent directory so the rename is durable.
    """
    parent = final.parent
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        # ``tmp`` now holds the old folder.
        _fsync_path(parent)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        aside = Path(tempfile.mkdtemp(prefix=aside_prefix, dir=parent))
        aside.rmdir()  # only the unique name is wanted; rename needs it free (or empty)
        os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_path(parent)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_path(parent)


# --- RNG state ------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    """All RNG states as values ``torch.load(weights_only=True)`` can read back."""
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(np_name),
            "key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state((
        npst["bit_generator"],
        npst["key"].numpy().astype(np.uint32),
        npst["pos"],
        npst["has_gauss"],
        npst["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None:
        if torch.cuda.is_available():
            logger.warning("[checkpoint] checkpoint has no CUDA RNG state; CUDA RNG not restored")
        return
    if not torch.cuda.is_available():
        logger.warning("[checkpoint] checkpoint has a CUDA RNG state but CUDA is not available")
    elif len(cuda) != torch.cuda.device_count():
        logger.warning(
            "[checkpoint] checkpoint has CUDA RNG states for %d devices, this process sees %d; "
            "CUDA RNG not restored", len(cuda), torch.cuda.device_count(),
        )
    else:
        torch.cuda.set_rng_state_all(cuda)


# --- checkpoints ----------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int | None:
    m = _CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def _read_state_json(path: Path) -> dict[str, Any] | None:
    """The checkpoint's trainer_state.json if it is readable and of one of our formats, else
    None."""
    try:
        d = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if state_format(d) is not None else None


def _scan(output_dir: Path) -> tuple[list[tuple[int, Path]], list[Path]]:
    """(complete checkpoints as (step, path) sorted by step, incomplete checkpoint folders)."""
    complete: list[tuple[int, Path]] = []
    incomplete: list[Path] = []
    if not output_dir.is_dir():
        return complete, incomplete
    for p in output_dir.iterdir():
        step = _checkpoint_step(p)
        if step is None or not p.is_dir():
            continue
        if _read_state_json(p) is None:
            incomplete.append(p)
        else:
            complete.append((step, p))
    complete.sort(key=lambda sp: sp[0])
    incomplete.sort(key=lambda p: p.name)
    return complete, incomplete


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None if there is none.

    Folders without a readable ``trainer_state.json`` of harli's (a crash mid-write, or a
    foreign folder) and ``.tmp-checkpoint-*`` leftovers are skipped.
    """
    complete, incomplete = _scan(output_dir)
    for p in incomplete:
        logger.warning("[checkpoint] ignoring incomplete checkpoint %s (no valid %s)", p,
                       STATE_FILE)
    return complete[-1][1] if complete else None


def _prune(output_dir: Path, keep: int, just_saved: Path) -> None:
    complete, incomplete = _scan(output_dir)
    old = [p for _, p in complete[:-keep]] if len(complete) > keep else []
    for p in old:
        if p == just_saved:  # stale checkpoints of a later step are in the dir; keep ours
            logger.warning("[checkpoint] %s has checkpoints newer than %s", output_dir, p.name)
            continue
        logger.info("[checkpoint] pruning %s", p)
        shutil.rmtree(p, ignore_errors=True)
    for p in incomplete:
        logger.warning("[checkpoint] removing incomplete checkpoint %s", p)
        shutil.rmtree(p, ignore_errors=True)
    for p in output_dir.iterdir():
        if p.name.startswith(TMP_CHECKPOINT_PREFIX):
            logger.info("[checkpoint] removing leftover %s", p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def save_checkpoint(
    output_dir: Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    keep: int,
    plan: RunPlan,
) -> Path:
    """Write ``output_dir/checkpoint-{state.step}`` atomically, prune, return its path.

    Keeps the newest ``keep`` complete checkpoints (the one just written always among them) and
    removes incomplete checkpoint folders and ``.tmp-checkpoint-*`` leftovers.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{state.step}"
    tmp = _make_tmp_dir(output_dir, f"{TMP_CHECKPOINT_PREFIX}{state.step}-")
    try:
        model.save_pretrained(str(tmp))
        if not (tmp / ADAPTER_WEIGHTS).is_file():
            raise RuntimeError(f"model.save_pretrained wrote no {ADAPTER_WEIGHTS} in {tmp}")
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        torch.save(_rng_state(), tmp / RNG_FILE)
        _fsync_tree(tmp)
        # The completeness marker goes last, after everything else is on disk.
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            # As HF's TrainerState.save_to_json writes it.
            json.dump(state.to_json(plan), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        _install_dir(tmp, final, TMP_CHECKPOINT_PREFIX)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("[checkpoint] saved %s (step %d, micro-step %d, epoch %d)", final, state.step,
                state.micro_step, state.epoch)
    _prune(output_dir, keep, final)
    return final


def load_checkpoint(
    path: Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and all RNG states from a checkpoint.

    ``model``, ``optimizer`` and ``scheduler`` must be built the same way as when it was saved
    (same LoRA config, same parameter order). Returns the saved TrainerState.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    d = _read_state_json(path)
    if d is None:
        raise ValueError(f"{path} is not a complete checkpoint (no valid {STATE_FILE})")
    state = TrainerState.from_json(d)

    weights = load_file(str(path / ADAPTER_WEIGHTS), device="cpu")
    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise RuntimeError(f"{path}: adapter weights do not fit the model; unexpected keys "
                           f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")

    # Optimizer and scheduler state dicts hold only tensors and plain Python values, so the safe
    # loader reads them. map_location="cpu": Optimizer.load_state_dict moves state to the
    # parameters' devices itself.
    optimizer.load_state_dict(
        torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    scheduler.load_state_dict(
        torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    _set_rng_state(torch.load(path / RNG_FILE, map_location="cpu", weights_only=True))
    logger.info("[checkpoint] resumed from %s (step %d, micro-step %d, epoch %d, cursor %d)",
                path, state.step, state.micro_step, state.epoch, state.cursor)
    return state


def save_final_adapter(model: PeftModel, output_dir: Path) -> Path:
    """Write the adapter atomically to ``output_dir/adapter`` (replacing an older one).

    The result loads with ``peft.PeftModel.from_pretrained(base, output_dir / "adapter")``.
    """
    output_dir = Path(output_dir)
    final = output_dir / ADAPTER_DIR
    tmp = _make_tmp_dir(output_dir, TMP_ADAPTER_PREFIX)
    try:
        model.save_pretrained(str(tmp))
        if not (tmp / ADAPTER_WEIGHTS).is_file():
            raise RuntimeError(f"model.save_pretrained wrote no {ADAPTER_WEIGHTS} in {tmp}")
        _fsync_tree(tmp)
        _install_dir(tmp, final, TMP_ADAPTER_PREFIX)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in output_dir.iterdir():  # leftovers of earlier crashed saves
        if p.name.startswith(TMP_ADAPTER_PREFIX) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
    logger.info("[checkpoint] saved final adapter to %s", final)
    return final
