"""The inference channel's wire types: a client's DEALER <-> the daemon's ROUTER.

Map-encoded structs tagged by a ``type`` field, so that a client in another language can build
them from ``docs/protocol.md`` and validation errors name the offending field
(``$.max_tokens``). Bump ``PROTOCOL_VERSION`` on any incompatible change.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

PROTOCOL_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Public API: client -> daemon
# ---------------------------------------------------------------------------------------------

RequestId = Annotated[str, Meta(min_length=1, max_length=256)]
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
TokenId = Annotated[int, Meta(ge=0)]


class _Public(msgspec.Struct, tag_field="type", kw_only=True, frozen=True,
              forbid_unknown_fields=True):
    pass


class Hello(_Public, tag="hello", frozen=True):
    """Optional first message: checks the protocol version and returns server facts."""

    protocol_version: int
    client: str = ""


ModelName = Annotated[str, Meta(min_length=1, max_length=256)]


class Generate(_Public, tag="generate", frozen=True):
    """Start one streaming generation. Exactly one of ``prompt`` / ``prompt_token_ids``."""

    request_id: RequestId
    prompt: str | None = None
    prompt_token_ids: list[TokenId] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] = 16
    temperature: Annotated[float, Meta(ge=0.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=-1)] = -1
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[TokenId] = []
    ignore_eos: bool = False
    detokenize: bool = True
    # The model to serve it: the base model (None, or its name) or a registered LoRA
    # adapter's name (a finished job's, ``NAME@step-N``, or one ``harli adapter add`` named).
    model: ModelName | None = None
    # Log-probabilities of each generated token and of its ``logprobs`` most likely
    # alternatives (0: the token's own only); None: none (vLLM computes them only when asked).
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    # vLLM's ``SamplingParams`` whole, as a map of its fields (``n``, ``presence_penalty``,
    # ``min_p``, ``logit_bias``, ``prompt_logprobs``, ``structured_outputs``, ...): when given,
    # it is the request's sampling, checked by vLLM itself, and the fields above from
    # ``max_tokens`` to ``logprobs`` must stay at their defaults.
    # (Raw: passed to decode as sent; absent or nil means none.)
    sampling_params: msgspec.Raw = msgspec.Raw(b"\xc0")


def has_sampling_params(g: Generate) -> bool:
    """Whether ``g`` carries vLLM's ``SamplingParams`` (not absent, not nil)."""
    raw = g.sampling_params
    return len(raw) > 0 and bytes(raw) != b"\xc0"


# The fields of ``Generate`` that ``sampling_params`` replaces.
FLAT_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                        "stop_token_ids", "ignore_eos", "detokenize", "logprobs")


class Abort(_Public, tag="abort", frozen=True):
    """Stop a request of this client; it ends with ``finish_reason == "abort"``."""

    request_id: RequestId


ClientMessage = Hello | Generate | Abort

# ---------------------------------------------------------------------------------------------
# Public API: daemon -> client
# ---------------------------------------------------------------------------------------------


class Welcome(_Public, tag="welcome", frozen=True):
    protocol_version: int
    # True once the decode engine is serving; requests sent before are queued, not refused.
    ready: bool
    server_version: str
    model: str
    max_model_len: int
    max_message_bytes: int


class TokenLogprob(msgspec.Struct, kw_only=True, frozen=True):
    """One token's log-probability and the most likely alternatives at its place (as many as
    asked, most likely first; they may include the token itself): vLLM's map of ``Logprob``
    at that place, in its order. ``rank`` is vLLM's (1: the most likely) and ``token`` the
    text vLLM decoded for it; the ``top_`` lists hold the same for each alternative."""

    token_id: int
    logprob: float
    top_ids: list[int] = []
    top_logprobs: list[float] = []
    rank: int | None = None
    token: str | None = None
    top_ranks: list[int | None] = []
    top_tokens: list[str | None] = []


class Chunk(_Public, tag="chunk", frozen=True):
    """New tokens of one completion of a request from one decode iteration (or the final,
    empty one). A request of ``n`` completions streams chunks of each ``index``."""

    request_id: str
    token_ids: list[int]
    text: str = ""
    # Wall-clock (Unix) time at which each token in ``token_ids`` was produced.
    token_times_s: list[float] = []
    # None while the completion streams; "length", "stop", "abort", "error", "shutdown" or
    # "adapter_removed" (``harli adapter rm --force`` of the request's adapter) on its last
    # chunk.
    finish_reason: str | None = None
    # The stop string or token id that ended the completion, when finish_reason == "stop".
    stop_reason: str | int | None = None
    num_prompt_tokens: int | None = None
    # One per token of ``token_ids`` when the request asked for ``logprobs``; else None.
    logprobs: list[TokenLogprob] | None = None
    index: int = 0  # which of the request's ``n`` completions
    # True on the request's last chunk: every completion has ended.
    finished: bool = False
    # The sum of the completion's token log-probabilities so far, when logprobs were asked.
    cumulative_logprob: float | None = None
    # On the request's first chunk, when it asked for ``prompt_logprobs``: one per prompt
    # token (None for the first, which has no context).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Prompt tokens whose KV vLLM found in its prefix cache (first chunk).
    num_cached_tokens: int | None = None
    # Prompt tokens vLLM computed and wrote to its prefix cache (first chunk).
    num_cache_creation_tokens: int | None = None


class Error(_Public, tag="error", frozen=True):
    """A request (or a message) that could not be served. ``request_id`` is None when the
    message could not be attributed to a request (e.g. undecodable bytes)."""

    request_id: str | None
    code: str
    message: str


ServerMessage = Welcome | Chunk | Error


class ErrorCode:
    """Stable ``Error.code`` values (see docs/protocol.md)."""

    MALFORMED = "malformed"  # not MessagePack, or not a map with a known ``type``
    UNKNOWN_TYPE = "unknown_type"
    INVALID = "invalid"  # a field is missing, of the wrong type or out of range
    TOO_LARGE = "too_large"
    PROTOCOL_VERSION = "protocol_version"
    DUPLICATE_REQUEST = "duplicate_request"
    UNKNOWN_REQUEST = "unknown_request"
    REJECTED = "rejected"  # the engine refused the request (e.g. prompt longer than the model)
    DECODE_DIED = "decode_died"
    SHUTTING_DOWN = "shutting_down"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    TIMEOUT = "timeout"  # the work outlasted the client's stated wait, and was not done
    UNKNOWN_MODEL = "unknown_model"  # neither the base model nor a registered adapter
    NOT_FOUND = "not_found"  # a control request names something the daemon does not have
    CONFLICT = "conflict"  # a name already taken, or an adapter in use
