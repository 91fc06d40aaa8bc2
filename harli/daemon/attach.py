"""Checks a job must pass before it is stored: everything that can be refused at attach time
is refused here, with a message that says what to change, so nothing is half-stored."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from harli.datasets import DatasetLimits, DatasetReport, TokenizedCache
from harli.ipc.jobs import JobSpec

logger = logging.getLogger(__name__)


class AttachRefused(Exception):
    pass


def module_names(model_dir: Path) -> set[str]:
    """Names of the model's weight-bearing modules, from its safetensors headers."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names.update(k.rsplit(".", 1)[0] for k in st.keys())  # noqa: SIM118 - not a dict
    return names


def check_target_modules(targets: list[str], modules: set[str]) -> None:
    # PEFT's rule: a target matches a module whose name equals it or ends with "." + target.
    unknown = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if unknown:
        leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
        raise AttachRefused(f"unknown target module(s) {unknown} for this model; its modules "
                            f"are named {leaves}")


def check_output_dir(path: Path, taken: dict[str, str], roots: list[Path]) -> None:
    """``path`` must be absolute, lie strictly under one of ``roots`` once symlinks are
    resolved (the daemon may run as a user that can write where a job's author cannot), be used
    by no active job, and be new or empty (no job overwrites what it did not write)."""
    if not path.is_absolute():
        raise AttachRefused(f"output_dir {path} must be an absolute path")
    real = Path(os.path.realpath(path))
    if not any(real != r and real.is_relative_to(r)
               for r in (Path(os.path.realpath(root)) for root in roots)):
        raise AttachRefused(
            f"output_dir {path} is outside the output roots ({', '.join(map(str, roots))}); "
            f"leave output_dir out for {roots[0]}/NAME, or have the operator add a root to "
            f"finetune.extra_output_roots")
    in_use = {os.path.realpath(p): name for p, name in taken.items()}
    if str(real) in in_use:
        raise AttachRefused(f"output_dir {path} is already used by job {in_use[str(real)]!r}")
    if real.is_dir() and any(real.iterdir()):
        raise AttachRefused(f"output_dir {path} is not empty; a job writes only into a new or "
                            f"empty directory")
    if real.exists() and not real.is_dir():
        raise AttachRefused(f"output_dir {path} is not a directory")
    probe = path
    while not probe.exists():  # the nearest existing ancestor must let us create it
        probe = probe.parent
    if not probe.is_dir():
        raise AttachRefused(f"output_dir {path}: {probe} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise AttachRefused(f"output_dir {path} is not writable ({probe}: {e.strerror})") from None


class AttachValidator:
    """Validates jobs against the served model; holds its tokenizer and module names.

    ``validate`` runs on several attach workers at once: each thread has its own tokenizer
    (a Hugging Face fast tokenizer is not safe to share across threads)."""

    def __init__(self, model_dir: Path, dataset_cache: TokenizedCache,
                 limits: DatasetLimits, output_roots: list[Path],
                 max_serving_rank: int | None = None) -> None:
        self.model_dir = model_dir
        # The highest LoRA rank decode serves (None: adapters are not served): a job of a
        # higher rank would train an adapter that can never be called.
        self.max_serving_rank = max_serving_rank
        self.output_roots = output_roots
        self.dataset_cache = dataset_cache
        self.limits = limits
        # Set when the daemon stops: a dataset being read or tokenized stops at its next line.
        self.cancel = threading.Event()
        self._local = threading.local()
        self._modules: set[str] | None = None

    def _tokenizer(self) -> Any:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            from transformers import AutoTokenizer

            tok = self._local.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        return tok

    def validate(self, spec: JobSpec, taken_output_dirs: dict[str, str]) -> dict[str, Any]:
        """Raise ``AttachRefused`` naming the problem, or return the dataset report. The
        dataset is tokenized here, once: the finetune reads the examples from the cache."""
        if spec.base_model and os.path.realpath(spec.base_model) != os.path.realpath(
                self.model_dir):
            raise AttachRefused(f"the job is for base model {spec.base_model}, but this daemon "
                                f"serves {self.model_dir}; a job trains on the served model")
        if self.max_serving_rank is not None and spec.lora.r > self.max_serving_rank:
            raise AttachRefused(f"lora.r {spec.lora.r} is above the highest rank decode serves "
                                f"({self.max_serving_rank}, lora.max_lora_rank): the adapter "
                                f"could never be called; train at rank {self.max_serving_rank} "
                                f"or less, or raise lora.max_lora_rank")
        check_output_dir(Path(spec.output_dir), taken_output_dirs, self.output_roots)
        for key, path in (("dataset", spec.dataset), ("validation_file", spec.validation_file)):
            if path and not Path(path).is_absolute():
                raise AttachRefused(f"{key} {path} must be an absolute path")
        if self._modules is None:  # read once; a racing second read gives the same set
            self._modules = module_names(self.model_dir)
        check_target_modules(list(spec.lora.target_modules), self._modules)
        report = self._check_dataset(spec.dataset, spec.max_seq_len, "dataset",
                                     "to learn from").as_dict()
        if spec.validation_file:
            # The same checks as the training set's, and tokenized into the same cache.
            valid = self._check_dataset(spec.validation_file, spec.max_seq_len,
                                        "validation_file", "to score")
            report.update({f"validation_{k}": v for k, v in valid.as_dict().items()
                           if k != "source"})
        return report

    def _check_dataset(self, path: str, max_seq_len: int, key: str,
                       purpose: str) -> DatasetReport:
        from harli.datasets import DatasetError, load_dataset

        try:
            _, report = load_dataset(path, self._tokenizer(), max_seq_len, self.dataset_cache,
                                     self.limits, self.cancel)
        except DatasetError as e:
            raise AttachRefused(str(e) if key == "dataset" else f"{key}: {e}") from None
        if report.loss_tokens == 0:
            raise AttachRefused(f"{key} {path}: no response tokens left {purpose} at "
                                f"max_seq_len {max_seq_len}")
        return report
