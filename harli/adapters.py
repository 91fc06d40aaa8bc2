"""PEFT LoRA adapter directories: what one must hold before it is registered for serving.

An adapter directory is what PEFT's ``save_pretrained`` writes (a Harli job's ``output_dir``
and each of its checkpoints hold one): ``adapter_config.json`` (``peft_type`` LORA, ``r``,
``lora_alpha``, ``target_modules``, ``base_model_name_or_path``) and
``adapter_model.safetensors``. ``inspect_adapter`` reads both far enough to refuse, with a
message that names the problem, a directory that is missing, not an adapter, half-written (a
weights file cut short or whose header does not parse), of another base model, or of a rank
above what decode was built for. vLLM loads the weights itself; this is the check that comes
first and says why in words a user can act on.

No torch: the safetensors header is its own JSON (8-byte length, then the header, then the
data), so a cut-short file is found without reading the tensors.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Fields of a base model's config.json that must agree for an adapter trained on one to fit
# the other (the tensors' shapes follow from them).
_SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "vocab_size")
_MAX_HEADER_BYTES = 100 * 2**20


class AdapterError(ValueError):
    """An adapter directory that cannot be served; the message names the problem."""


@dataclass(frozen=True)
class AdapterInfo:
    path: str  # resolved
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str  # base_model_name_or_path as the adapter records it
    weights_bytes: int


def inspect_adapter(path: str | Path, *, base_model_dir: Path, max_rank: int) -> AdapterInfo:
    """The adapter at ``path``, checked against the served base model (its directory) and the
    highest rank decode serves; ``AdapterError`` names what is wrong."""
    root = Path(path).expanduser()
    if not root.is_absolute():
        raise AdapterError(f"adapter path {str(path)!r} must be absolute (the daemon resolves "
                           f"it, not your shell)")
    if not root.is_dir():
        raise AdapterError(f"adapter path {root} is not a directory" if root.exists()
                           else f"adapter path {root} does not exist")
    root = root.resolve()
    conf = _read_config(root)
    if str(conf.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{root / CONFIG_FILE}: peft_type is {conf.get('peft_type')!r}, not "
                           f"'LORA': only LoRA adapters are served")
    rank = conf.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{root / CONFIG_FILE}: r must be an integer >= 1, got {rank!r}")
    if rank > max_rank:
        raise AdapterError(f"adapter {root} has rank {rank}, above the highest rank decode "
                           f"serves ({max_rank}, lora.max_lora_rank)")
    alpha = conf.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterError(f"{root / CONFIG_FILE}: lora_alpha must be a number, got {alpha!r}")
    modules = conf.get("target_modules")
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, list) or not modules or \
            not all(isinstance(m, str) for m in modules):
        raise AdapterError(f"{root / CONFIG_FILE}: target_modules must be a non-empty list of "
                           f"module names, got {modules!r}")
    base = conf.get("base_model_name_or_path") or ""
    if not isinstance(base, str):
        raise AdapterError(f"{root / CONFIG_FILE}: base_model_name_or_path must be a string")
    _check_base(root, base, base_model_dir)
    return AdapterInfo(path=str(root), rank=rank, alpha=float(alpha),
                       target_modules=tuple(modules), base_model=base,
                       weights_bytes=_check_weights(root / WEIGHTS_FILE))


def _read_config(root: Path) -> dict[str, Any]:
    p = root / CONFIG_FILE
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise AdapterError(f"{root} holds no {CONFIG_FILE}: not a PEFT adapter directory (or "
                           f"one still being written)") from None
    except OSError as e:
        raise AdapterError(f"cannot read {p}: {e.strerror}") from None
    try:
        conf = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{p} is not valid JSON ({e}): a corrupt or half-written "
                           f"adapter") from None
    if not isinstance(conf, dict):
        raise AdapterError(f"{p} must hold a JSON object")
    return conf


def _check_base(root: Path, base: str, served: Path) -> None:
    """The adapter's recorded base model must be the served one: the same directory, or a
    model whose config gives the same shapes; a bare name must match the served model's."""
    if not base:
        raise AdapterError(f"{root / CONFIG_FILE} names no base_model_name_or_path: cannot tell "
                           f"whether it fits the served model {served.name}")
    served_conf = _model_config(served)
    base_path = Path(base)
    if base_path.is_absolute() and base_path.is_dir():
        if base_path.resolve() == served.resolve():
            return
        theirs = _model_config(base_path)
        if theirs is not None and served_conf is not None and \
                all(theirs.get(k) == served_conf.get(k) for k in _SHAPE_KEYS):
            return
        raise AdapterError(f"adapter {root} was trained on base model {base}, not the served "
                           f"model {served} (their configs differ)")
    if base_path.name != served.name:
        raise AdapterError(f"adapter {root} was trained on base model {base!r}, not the served "
                           f"model {served.name!r}")


def _model_config(model_dir: Path) -> dict[str, Any] | None:
    try:
        conf = json.loads((model_dir / "config.json").read_bytes())
    except (OSError, ValueError):
        return None
    return conf if isinstance(conf, dict) else None


def _check_weights(p: Path) -> int:
    """The safetensors file's size, once its header parses and its data is all there."""
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AdapterError(f"{p} is {size} bytes: cut short before its header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise AdapterError(f"{p}: a header of {n} bytes in a file of {size}: corrupt "
                                   f"or cut short")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise AdapterError(f"{p.parent} holds no {WEIGHTS_FILE} (a half-written adapter, or "
                           f"one saved without safetensors)") from None
    except OSError as e:
        raise AdapterError(f"cannot read {p}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterError(f"{p}: its header is not valid JSON: a corrupt adapter") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{p}: its header is not a JSON object: a corrupt adapter")
    ends = [t.get("data_offsets", [0, 0])[1] for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict)]
    if not ends:
        raise AdapterError(f"{p} holds no tensors")
    need = 8 + n + max(int(e) for e in ends)
    if size < need:
        raise AdapterError(f"{p} is {size} bytes, its header says {need}: cut short (still "
                           f"being written?)")
    return size
