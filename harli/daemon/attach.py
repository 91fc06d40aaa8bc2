"""Checks a job must pass before it is stored: everything that can be refused at once, before
its files are read, is refused here with a message that says what to change. Its files'
contents are checked in the background once it is stored (``validation.py``)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from harli.ipc.jobs import JobSpec
from harli.paths import BadPath, check_path

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
    """The checks a job passes before it is stored, against the served model: everything but
    its files' contents, which ``DatasetValidations`` checks in the background once it is
    stored. Runs on the daemon's loop: it reads the model's config and module names once, and
    makes only a few system calls per job, on paths already checked as paths."""

    def __init__(self, model_dir: Path, output_roots: list[Path],
                 max_serving_rank: int | None = None) -> None:
        self.model_dir = model_dir
        # The highest LoRA rank decode serves (None: adapters are not served): a job of a
        # higher rank would train an adapter that can never be called.
        self.max_serving_rank = max_serving_rank
        self.output_roots = output_roots
        self._modules: set[str] | None = None
        self._context: int | None = None

    def check(self, spec: JobSpec, taken_output_dirs: dict[str, str]) -> None:
        """Raise ``AttachRefused`` naming the problem and what to change."""
        try:
            for key in ("output_dir", "dataset", "validation_file", "base_model"):
                value = getattr(spec, key)
                if value:
                    check_path(value, key, absolute=key != "base_model")
        except BadPath as e:
            raise AttachRefused(str(e)) from None
        if spec.base_model and os.path.realpath(spec.base_model) != os.path.realpath(
                self.model_dir):
            raise AttachRefused(f"the job is for base model {spec.base_model}, but this daemon "
                                f"serves {self.model_dir}; a job trains on the served model")
        if self.max_serving_rank is not None and spec.lora.r > self.max_serving_rank:
            raise AttachRefused(f"lora.r {spec.lora.r} is above the highest rank decode serves "
                                f"({self.max_serving_rank}, lora.max_lora_rank): the adapter "
                                f"could never be called; train at rank {self.max_serving_rank} "
                                f"or less, or raise lora.max_lora_rank")
        context = self.context_tokens()
        if context is not None and spec.max_seq_len > context:
            raise AttachRefused(f"max_seq_len {spec.max_seq_len} is above the model's context of "
                                f"{context} tokens (max_position_embeddings); use "
                                f"{context} or less")
        try:
            check_output_dir(Path(spec.output_dir), taken_output_dirs, self.output_roots)
        except OSError as e:  # a directory on the way that cannot be read, a dead mount
            raise AttachRefused(f"output_dir {spec.output_dir}: cannot be checked "
                                f"({e.strerror or e})") from None
        if self._modules is None:
            self._modules = module_names(self.model_dir)
        check_target_modules(list(spec.lora.target_modules), self._modules)

    def context_tokens(self) -> int | None:
        """The model's context length (its config's ``max_position_embeddings``), read once;
        None when the config does not say."""
        if self._context is None:
            try:
                config = json.loads((self.model_dir / "config.json").read_text())
            except (OSError, ValueError) as e:
                logger.warning("[attach] cannot read %s/config.json (%s); max_seq_len is not "
                               "checked against the model's context", self.model_dir, e)
                return None
            value = config.get("max_position_embeddings")
            if not isinstance(value, int) or value < 1:
                return None
            self._context = value
        return self._context
