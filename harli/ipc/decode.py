"""The decode channel's wire types: daemon <-> decode_proc, and decode's telemetry.

Internal family: ``array_like`` structs tagged by their class name, compact and fast, only ever
produced by our own code of the same version.
"""

from __future__ import annotations

import msgspec

from harli.ipc.inference import Generate, TokenLogprob
from harli.ipc.weights import WeightsExported

# ---------------------------------------------------------------------------------------------
# Internal: daemon <-> decode_proc
# ---------------------------------------------------------------------------------------------


class _Internal(msgspec.Struct, tag=True, kw_only=True, array_like=True, frozen=True):
    pass


class LoraTarget(_Internal, frozen=True):
    """The adapter a request is served with: vLLM's ``LoRARequest`` fields."""

    name: str
    lora_id: int  # vLLM's lora_int_id: one per registered adapter, never reused
    path: str


class AddRequest(_Internal, frozen=True):
    """Daemon -> decode_proc: admit ``request`` under the engine-wide id ``rid``, served by
    the base model or, with ``lora``, by that adapter."""

    rid: str
    request: Generate
    arrival_s: float
    lora: LoraTarget | None = None


class UnloadAdapter(_Internal, frozen=True):
    """Daemon -> decode_proc: drop an unregistered adapter from vLLM's cache."""

    lora_id: int


class AbortRequests(_Internal, frozen=True):
    rids: list[str]


class Shutdown(_Internal, frozen=True):
    """Ask a child to stop at its next loop turn (first rung of the stop ladder)."""

    reason: str


class LendBlocks(_Internal, frozen=True):
    """Daemon -> decode_proc: withdraw up to ``max_groups`` groups of ``blocks_per_group``
    aligned KV blocks from vLLM's free queue, between iterations, and answer ``BlocksLent``.
    Only groups whose every block is free are taken; a block in use is never lent."""

    seq: int
    max_groups: int
    blocks_per_group: int


class ReturnBlocks(_Internal, frozen=True):
    """Daemon -> decode_proc: give lent groups back to vLLM's free queue (the finetune has
    released their pages, or is dead); answered by ``BlocksReturned``."""

    seq: int
    groups: list[int]
    # Zero the blocks before vLLM may use them: some page of theirs holds bytes the finetune
    # wrote and did not clear (it died, or did not say it zeroed them).
    scrub: bool = True


DaemonToDecode = AddRequest | AbortRequests | Shutdown | LendBlocks | ReturnBlocks | UnloadAdapter


class KVLayout(_Internal, frozen=True):
    """Where vLLM's KV blocks lie in the arena: block ``b`` of layer ``l`` is the byte range
    ``[layer_offsets_bytes[l] + b * block_bytes, ... + block_bytes)``."""

    layer_offsets_bytes: list[int]
    block_bytes: int
    num_blocks: int


class RuntimeInfo(_Internal, frozen=True):
    """Facts a child discovers at start (never written back into config)."""

    model: str
    max_model_len: int
    kv_blocks_total: int
    block_size: int
    vllm_version: str
    device: str
    kv_layout: KVLayout | None = None  # None: KV cache not in the arena, nothing to lend


class Ready(_Internal, frozen=True):
    incarnation: int
    pid: int
    info: RuntimeInfo


class CompletionDelta(_Internal, frozen=True):
    """What one iteration added to one completion of a request (vLLM's ``CompletionOutput``
    in its DELTA form)."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked
    cumulative_logprob: float | None = None


class RequestOutput(_Internal, frozen=True):
    rid: str
    completions: list[CompletionDelta]
    finished: bool  # every completion has ended
    num_prompt_tokens: int
    # First output only, when asked: one per prompt token (None for the first).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int | None = None
    # Prompt tokens computed and written to the prefix cache (vLLM's count).
    num_cache_creation_tokens: int | None = None

    @classmethod
    def single(cls, rid: str, token_ids: list[int], text: str, finish_reason: str | None,
               stop_reason: str | int | None, num_prompt_tokens: int) -> RequestOutput:
        """The output of a request of one completion (finished when it has a reason)."""
        return cls(rid=rid, completions=[CompletionDelta(
            index=0, token_ids=token_ids, text=text, finish_reason=finish_reason,
            stop_reason=stop_reason)], finished=finish_reason is not None,
            num_prompt_tokens=num_prompt_tokens)

    @classmethod
    def ended(cls, rid: str, reason: str) -> RequestOutput:
        """The last output of a request that ended outside vLLM's step (aborted)."""
        return cls.single(rid, [], "", reason, None, 0)


class RequestRejected(_Internal, frozen=True):
    rid: str
    message: str


class StepOutputs(_Internal, frozen=True):
    """Everything one decode iteration produced, plus requests the engine refused."""

    incarnation: int
    iteration: int
    end_wall_s: float
    outputs: list[RequestOutput]
    rejected: list[RequestRejected] = []
    # The adapters vLLM holds loaded now (lora ids), when that set changed since the last
    # StepOutputs; None: unchanged.
    loras_loaded: list[int] | None = None


class Fatal(_Internal, frozen=True):
    """Last words of a child that is about to exit on an unrecoverable error."""

    incarnation: int
    error: str
    traceback: str


class BlocksLent(_Internal, frozen=True):
    """Decode_proc's answer to ``LendBlocks``: the groups withdrawn (maybe fewer than asked,
    maybe none) and the free blocks left in vLLM's queue."""

    incarnation: int
    seq: int
    groups: list[int]
    kv_blocks_free: int


class BlocksReturned(_Internal, frozen=True):
    """Decode_proc's answer to ``ReturnBlocks``; ``error`` names groups it did not lend.
    ``scrub_s``: the time decode spent zeroing the returned blocks before vLLM may use them."""

    incarnation: int
    seq: int
    groups: list[int]
    kv_blocks_free: int
    error: str | None = None
    scrub_s: float = 0.0


# WeightsExported (harli.ipc.weights): on a CUDA host with gpu.share_weights, once per engine
# start, before Ready.
DecodeToDaemon = Ready | StepOutputs | Fatal | BlocksLent | BlocksReturned | WeightsExported


class IterationTelemetry(_Internal, frozen=True):
    """One record per decode iteration, published on the telemetry socket.

    Times are ``time.monotonic()`` (CLOCK_MONOTONIC, comparable across processes on one host).
    """

    incarnation: int
    iteration: int
    start_s: float
    end_s: float
    num_running: int
    num_waiting: int
    decode_tokens: int
    prefill_tokens: int
    context_tokens: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_lent: int = 0
    waiting_tokens: int = 0  # prompt tokens of the requests still waiting
    preempted: int = 0  # requests vLLM's scheduler preempted in this iteration
    lend_seq: int = 0  # the last LendBlocks / ReturnBlocks applied before this iteration
    # sum over prefill requests of n * (c + n): n prompt tokens run now after c cached ones,
    # the quadratic attention work of prefill (a predictor feature)
    prefill_attn_tokens: int = 0
    lora_requests: int = 0  # requests of the batch served with a LoRA adapter
    lora_adapters: int = 0  # distinct adapters in the batch
    # Names of the adapters of the requests vLLM's scheduler holds running / waiting, sorted
    # (vLLM's running_lora_adapters / waiting_lora_adapters); empty with LoRA off.
    running_lora_adapters: list[str] = []
    waiting_lora_adapters: list[str] = []
