"""The finetune's HF/PEFT model built on views of decode's weights instead of a second copy.

On a GPU host the frozen base weights are the largest thing the finetune would hold, and decode
already holds them. The decode process exports each vLLM parameter (``harli.arena.weights``: CUDA
IPC handle of the allocation holding it, offset, shape, stride, dtype), the finetune maps them
and binds its HF model's
parameters to views of them (``bind_shared_weights``). Only LoRA's adapter weights are its own.

The name mapping is the inverse of vLLM's loader for Llama-like models
(``vllm/model_executor/models/llama.py``, ``LlamaModel.hf_to_vllm_mapper``, vLLM 0.32):
``q_proj, k_proj, v_proj`` are stacked in that order into ``qkv_proj`` (rows: q is
``num_attention_heads * head_dim``, k and v ``num_key_value_heads * head_dim`` each) and
``gate_proj, up_proj`` into ``gate_up_proj`` (``intermediate_size`` rows each). vLLM pads the
vocabulary of ``embed_tokens`` and ``lm_head`` to a multiple of 64 rows
(``DEFAULT_VOCAB_PADDING_SIZE``); the HF parameter is the first ``vocab_size`` rows. A tied
``lm_head`` is not a separate vLLM parameter. Tensor-parallel shards are not handled: with
TP > 1 a rank holds a slice of the heads and the row counts no longer match (bind fails loudly).

Row slices of a row-major matrix are contiguous, so every HF weight is a plain view. Decode's
weights are read-only for the finetune: the base parameters are bound with
``requires_grad=False`` and an adapter must never be merged into them (``merge_and_unload``
would write into decode's memory).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harli.arena.weights import WeightShareError

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

VOCAB_PADDING = 64  # vllm.model_executor.layers.vocab_parallel_embedding


# ---------------------------------------------------------------------------------------------
# Name and row mapping (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """What the row split of the fused vLLM tensors depends on, from the HF config."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Any) -> LlamaShape:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(num_attention_heads=heads,
                   num_key_value_heads=int(getattr(config, "num_key_value_heads", None)
                                           or heads),
                   head_dim=int(head_dim), intermediate_size=int(config.intermediate_size),
                   vocab_size=int(config.vocab_size),
                   tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def q_rows(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class WeightView:
    """An HF parameter = rows ``[row_start, row_stop)`` of the vLLM parameter ``vllm_name``."""

    vllm_name: str
    row_start: int
    row_stop: int


_STACKED = {
    ".qkv_proj.": (".q_proj.", ".k_proj.", ".v_proj."),
    ".gate_up_proj.": (".gate_proj.", ".up_proj."),
}
_VOCAB_PARAMS = ("embed_tokens.weight", "lm_head.weight")


def _parts(shape: LlamaShape, fused: str) -> tuple[int, ...]:
    if fused == ".qkv_proj.":
        return shape.q_rows, shape.kv_rows, shape.kv_rows
    return shape.intermediate_size, shape.intermediate_size


def hf_weight_views(shape: LlamaShape,
                    vllm_shapes: Mapping[str, Sequence[int]]) -> dict[str, WeightView]:
    """For every HF parameter of a Llama-like model, the vLLM parameter and rows it is.

    ``vllm_shapes`` is ``{name: shape}`` of the vLLM model's parameters. Raises
    ``WeightShareError`` when a fused tensor's rows do not add up to what the HF config says.
    """
    views: dict[str, WeightView] = {}
    problems: list[str] = []
    for name, dims in vllm_shapes.items():
        rows = int(dims[0]) if len(dims) else 0
        fused = next((f for f in _STACKED if f in name), None)
        if fused is not None:
            parts = _parts(shape, fused)
            if rows != sum(parts):
                problems.append(f"{name} has {rows} rows; the HF config implies "
                                f"{' + '.join(map(str, parts))} = {sum(parts)} (heads "
                                f"{shape.num_attention_heads}, kv heads "
                                f"{shape.num_key_value_heads}, head_dim {shape.head_dim}, "
                                f"intermediate {shape.intermediate_size}; tensor-parallel "
                                f"shards are not supported)")
                continue
            start = 0
            for hf_part, n in zip(_STACKED[fused], parts, strict=True):
                views[name.replace(fused, hf_part)] = WeightView(name, start, start + n)
                start += n
        elif name.endswith(_VOCAB_PARAMS):
            if rows < shape.vocab_size:
                problems.append(f"{name} has {rows} rows, fewer than the vocabulary "
                                f"({shape.vocab_size})")
                continue
            views[name] = WeightView(name, 0, shape.vocab_size)
        else:
            views[name] = WeightView(name, 0, rows)
    if shape.tie_word_embeddings and "lm_head.weight" not in views:
        embed = next((v for n, v in views.items() if n.endswith("embed_tokens.weight")), None)
        if embed is not None:
            views["lm_head.weight"] = embed
    if problems:
        raise WeightShareError("; ".join(problems))
    return views


def hf_name(param_name: str) -> str:
    """An HF model's parameter name as the base model knows it, also when PEFT wraps it
    (``base_model.model.`` prefix, ``.base_layer.`` inside LoRA-wrapped modules)."""
    name = param_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _is_adapter(param_name: str) -> bool:
    return ".lora_" in param_name or param_name.startswith("lora_")


def fused_from_hf(state: Mapping[str, torch.Tensor], shape: LlamaShape,
                  pad_vocab_to: int = VOCAB_PADDING) -> dict[str, torch.Tensor]:
    """vLLM-style tensors (fused q/k/v and gate/up, padded vocabulary) built from an HF state
    dict: what decode's model holds, for tests and ``harli gpu-check`` without vLLM."""
    import torch

    if pad_vocab_to < 1:
        raise ValueError(f"vocabulary padding must be >= 1, got {pad_vocab_to}")
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if any(p in name for p in (".k_proj.", ".v_proj.", ".up_proj.")):
            continue
        if ".q_proj." in name:
            out[name.replace(".q_proj.", ".qkv_proj.")] = torch.cat(
                [state[name], state[name.replace(".q_proj.", ".k_proj.")],
                 state[name.replace(".q_proj.", ".v_proj.")]])
        elif ".gate_proj." in name:
            out[name.replace(".gate_proj.", ".gate_up_proj.")] = torch.cat(
                [state[name], state[name.replace(".gate_proj.", ".up_proj.")]])
        elif name.endswith(_VOCAB_PARAMS):
            if name == "lm_head.weight" and shape.tie_word_embeddings:
                continue
            padded = math.ceil(t.shape[0] / pad_vocab_to) * pad_vocab_to
            pad = t.new_zeros((padded - t.shape[0], *t.shape[1:]))
            out[name] = torch.cat([t, pad])
        else:
            out[name] = t.clone()
    return out


# ---------------------------------------------------------------------------------------------
# Binding an HF model's parameters to views
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BindReport:
    parameters: int  # HF parameters now views of shared tensors
    shared_bytes: int  # bytes of the shared tensors they view (each counted once)


def bind_shared_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                        shape: LlamaShape | None = None) -> BindReport:
    """Replace every base parameter of ``model`` (an HF Llama-like model, PEFT-wrapped or not)
    with a view of ``tensors`` (decode's parameters by vLLM name). No copy is made.

    Fails before changing anything on: an HF parameter with no shared tensor, a shared tensor no
    HF parameter uses, or a shape or dtype mismatch. A parameter still on the ``meta`` device
    (a placeholder, see ``build_shared_model``) may differ in dtype; it takes the shared one.
    """
    from torch import nn

    config = getattr(model, "config", None)
    if shape is None:
        if config is None:
            raise WeightShareError("the model has no .config; pass its LlamaShape")
        shape = LlamaShape.from_config(config)
    views = hf_weight_views(shape, {n: tuple(t.shape) for n, t in tensors.items()})

    problems: list[str] = []
    plan: list[tuple[str, WeightView]] = []
    used: set[str] = set()
    for full_name, param in model.named_parameters(remove_duplicate=False):
        if _is_adapter(full_name):
            continue
        name = hf_name(full_name)
        view = views.get(name)
        if view is None:
            problems.append(f"{name}: no shared tensor backs it")
            continue
        src = tensors[view.vllm_name]
        want = (view.row_stop - view.row_start, *src.shape[1:])
        if tuple(param.shape) != want:
            problems.append(f"{name}: HF expects {tuple(param.shape)}, rows "
                            f"[{view.row_start}, {view.row_stop}) of {view.vllm_name} are {want}")
            continue
        if param.device.type != "meta" and param.dtype != src.dtype:
            problems.append(f"{name}: HF has {param.dtype}, {view.vllm_name} is {src.dtype}; "
                            f"build the finetune model in {src.dtype}")
            continue
        plan.append((full_name, view))
        used.add(name)
    unused = sorted({v.vllm_name for n, v in views.items() if n not in used}
                    - {v.vllm_name for n, v in views.items() if n in used})
    problems.extend(f"{n}: shared but no HF parameter uses it" for n in unused)
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise WeightShareError("cannot bind the finetune model to decode's weights: "
                               + "; ".join(problems[:10]) + more)

    bound: dict[WeightView, nn.Parameter] = {}
    for full_name, view in plan:
        if view not in bound:
            data = tensors[view.vllm_name][view.row_start:view.row_stop]
            bound[view] = nn.Parameter(data, requires_grad=False)
        param = bound[view]
        module_name, _, attr = full_name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, param)
    shared = {id(tensors[v.vllm_name]): tensors[v.vllm_name] for v in bound}
    nbytes = sum(t.numel() * t.element_size() for t in shared.values())
    logger.info("[finetune] %d base parameters bound to %.1f MiB of shared weights",
                len(plan), nbytes / 2**20)
    return BindReport(parameters=len(plan), shared_bytes=nbytes)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters are ``meta`` placeholders (no memory, no init work) while
    buffers (rotary tables) stay real: what a model about to be bound needs."""
    import torch
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to(torch.device("meta")),
                                                    requires_grad=param.requires_grad)

    # The same patch accelerate's init_empty_weights(include_buffers=False) makes.
    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_shared_model(config: Any, tensors: Mapping[str, torch.Tensor],
                       device: str | torch.device | None = None) -> nn.Module:
    """An HF causal LM for ``config`` whose every parameter is a view of ``tensors``; its
    buffers are moved to ``device`` (default: the tensors' device)."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model: nn.Module = AutoModelForCausalLM.from_config(config)
    bind_shared_weights(model, tensors)
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise WeightShareError(f"parameters left unbound: {', '.join(meta[:5])}")
    if device is None:
        device = next(iter(tensors.values())).device
    # Moves buffers only: bound parameters are on ``device`` already, and ``to`` keeps a
    # tensor that needs no conversion as it is (no copy).
    model.to(device)
    return model
