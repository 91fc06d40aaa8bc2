"""Is ``model.path`` a model directory decode and the finetune can load? Checked by the daemon
before it starts its children, so that a wrong path is one clear error at start instead of a
child crashing through its restart budget (vLLM would take a missing directory for a Hugging
Face repo id and fail offline).
"""

from __future__ import annotations

from pathlib import Path

# Any one of these is a tokenizer transformers can load (fast JSON, its config, sentencepiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ModelDirError(Exception):
    """``model.path`` is not a loadable model directory; the message says why, naming it."""


def check_model_dir(path: Path, key: str = "model.path") -> None:
    """Raise ``ModelDirError`` unless ``path`` holds config.json, *.safetensors weights and a
    tokenizer. ``key`` is the setting the path came from, named in the message."""
    where = f"{key} = {str(path)!r}"
    if not str(path).strip():
        raise ModelDirError(f"{key} is empty: set it to a model directory")
    try:
        if not path.exists():
            raise ModelDirError(f"{where}: no such directory")
        if not path.is_dir():
            raise ModelDirError(f"{where}: not a directory")
        names = {p.name for p in path.iterdir()}
    except OSError as e:  # e.g. unreadable (ProtectHome=, permissions)
        raise ModelDirError(f"{where}: cannot read it: {e.strerror or e}") from None
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not any(n.endswith(".safetensors") for n in names):
        missing.append("*.safetensors weights")
    if not names.intersection(TOKENIZER_FILES):
        missing.append("tokenizer files (" + ", ".join(TOKENIZER_FILES) + ")")
    if missing:
        raise ModelDirError(f"{where}: not a model directory, missing " + "; ".join(missing))
