"""vLLM's ``EngineArgs`` for a Harli configuration: one place, so that the decode process's
engine, the HTTP front's copy of its configuration (for vLLM's serving layer: tokenizer, chat
template, limits, no weights) and the offline baseline are built alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harli.config import HarliConfig


def engine_args(cfg: HarliConfig, model_path: str, kv_cache_bytes: int | None = None, *,
                log_stats: bool = False) -> Any:
    """The ``EngineArgs`` for our config; also used by the offline baseline and the tests.
    ``kv_cache_bytes``: a fixed KV cache size on GPU (the CUDA arena's), instead of what
    ``gpu_memory_utilization`` leaves. ``log_stats``: vLLM's statistics (its Prometheus
    metrics and its periodic log line), as ``vllm serve`` keeps them; the decode engine's.
    The served name is the model directory's, as the daemon serves it (vLLM's
    ``model_name`` metric label)."""
    from vllm import EngineArgs

    kw: dict[str, Any] = {
        "model": model_path,
        "dtype": cfg.model.dtype,
        "max_num_seqs": cfg.decode.max_num_seqs,
        "enforce_eager": cfg.decode.enforce_eager,
        "gpu_memory_utilization": cfg.decode.gpu_memory_utilization,
        "disable_log_stats": not log_stats,
        "served_model_name": [Path(model_path).name],
    }
    if cfg.model.max_model_len:
        kw["max_model_len"] = cfg.model.max_model_len
    if cfg.decode.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = cfg.decode.max_num_batched_tokens
    if kv_cache_bytes is not None:
        kw["kv_cache_memory_bytes"] = kv_cache_bytes
    if cfg.lora.enabled:
        kw.update(enable_lora=True, max_loras=cfg.lora.max_loras,
                  max_lora_rank=cfg.lora.max_lora_rank, max_cpu_loras=cfg.lora.max_cpu_loras)
    return EngineArgs(**kw)
