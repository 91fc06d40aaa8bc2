"""A call between a model's blocks, in forward and in backward: where the finetune's training
thread can act on its quota inside a chunk instead of at the chunk's end.

Why: on CPU a level drop from a level that spills onto decode's cores is enforced by the
daemon at once (``CpuQuota.fence`` moves every thread onto the finetune's own cores), but the
OpenMP pool keeps its size until the training thread calls ``torch.set_num_threads``, which
only that thread can do for its own parallel regions. Until then two threads share one core,
and each barrier waits for the other to be scheduled: a LoRA chunk fenced that way trained
~290 tok/s on a 2-core host against ~3200 for one thread on the same core, so a 512-token
chunk held the whole busy stretch after a drop. A rise, the other way, is worth taking at
once: decode went idle, and the rest of the chunk can use the threads it left.

The call runs at each transformer block and each of its direct submodules (attention, MLP,
norms), before their forward and when their output's gradient arrives in backward (a tensor
hook: the block's backward starts there). Both run on the training thread: CPU autograd runs
backward on the thread that called it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["call_between_blocks"]


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block of every ``ModuleList`` in ``model`` (a decoder's layers) and each block's
    direct submodules."""
    out: list[torch.nn.Module] = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList):
            for block in m:
                out.append(block)
                out.extend(block.children())
    return out


def _first_grad_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor in a module's output that autograd will send a gradient to (a block
    returns a tensor, a tuple, or a ``ModelOutput``, depending on the transformers version)."""
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    items = output.values() if isinstance(output, dict) else \
        output if isinstance(output, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor) and item.requires_grad:
            return item
    return None


def call_between_blocks(model: torch.nn.Module, fn: Callable[[], object]
                        ) -> list[RemovableHandle]:
    """Call ``fn()`` before each block's (and block submodule's) forward and at the start of
    its backward. Returns the forward hooks' handles (removing them stops both). A model
    without a ``ModuleList`` gets no hooks."""

    def before_forward(_module: torch.nn.Module, _args: Any) -> None:
        fn()

    def at_backward(_grad: torch.Tensor) -> None:
        fn()  # and return None: a tensor hook that returns a tensor would replace the gradient

    def after_forward(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        t = _first_grad_tensor(output)
        if t is not None:
            t.register_hook(at_backward)

    handles: list[RemovableHandle] = []
    for m in _blocks(model):
        handles.append(m.register_forward_pre_hook(before_forward))
        handles.append(m.register_forward_hook(after_forward))
    return handles
