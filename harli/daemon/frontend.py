"""``Frontend``: the daemon's public inference endpoint, from client message to last chunk.

It reads clients' messages from the inference ROUTER (which the daemon creates and binds),
answers ``Hello``, accepts or refuses ``Generate`` and ``Abort``, keeps the ``RequestTable`` of
accepted requests, hands them to decode (at once, or when decode is ready) and routes decode's
``StepOutputs`` back to each client as ``Chunk``s. It tells the scheduler (its
``RequestObserver``) of arrivals, token gaps and finished requests, and the metrics of each
request's first token, token gaps and end (vLLM's per-request metrics). It reaches the rest of the
daemon only through the callables it is given; a client that has gone has its requests
aborted, and nothing a client sends stops the loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import zmq

import harli
from harli.config import HarliConfig
from harli.daemon.metrics import Metrics
from harli.daemon.models import UnknownModel
from harli.daemon.requests import DuplicateRequest, Inflight, RequestTable
from harli.daemon.supervisor import ChildExited, describe_returncode
from harli.ipc.codec import ClientDecoder, DecodeFailure, encode, request_id_of, router_batch
from harli.ipc.decode import (
    AbortRequests,
    AddRequest,
    DaemonToDecode,
    LoraTarget,
    RuntimeInfo,
    StepOutputs,
)
from harli.ipc.inference import (
    FLAT_SAMPLING_FIELDS,
    PROTOCOL_VERSION,
    Abort,
    Chunk,
    ClientMessage,
    Error,
    ErrorCode,
    Generate,
    Hello,
    Welcome,
    has_sampling_params,
)

logger = logging.getLogger(__name__)


class SamplingView(msgspec.Struct, frozen=True):
    """What the daemon reads of ``Generate.sampling_params`` to admit a request (vLLM checks
    the rest): the tokens each completion may take (None: up to the model's length) and how
    many completions."""

    max_tokens: int | None = 16
    n: int = 1


_VIEW = msgspec.msgpack.Decoder(SamplingView)
_FLAT_DEFAULTS = {f: getattr(Generate(request_id="x"), f) for f in FLAT_SAMPLING_FIELDS}


def sampling_problem(g: Generate) -> str | None:
    """Why ``g.sampling_params`` cannot be admitted, or None (vLLM checks its values)."""
    flat = [f for f in FLAT_SAMPLING_FIELDS if getattr(g, f) != _FLAT_DEFAULTS[f]]
    if flat:
        return (f"`sampling_params` replaces the flat sampling fields; {', '.join(flat)} "
                f"given beside it")
    try:
        view = _VIEW.decode(g.sampling_params)
    except msgspec.DecodeError as e:
        return f"`sampling_params`: {e}"
    if view.n < 1:
        return f"`sampling_params`: n must be at least 1, got {view.n}"
    if view.max_tokens is not None and view.max_tokens < 1:
        return f"`sampling_params`: max_tokens must be at least 1, got {view.max_tokens}"
    return None


def max_tokens_of(g: Generate) -> int | None:
    """The tokens each completion of ``g`` may take (None: up to the model's length)."""
    if not has_sampling_params(g):
        return g.max_tokens
    return _VIEW.decode(g.sampling_params).max_tokens


class RequestObserver(Protocol):
    """What the frontend tells the scheduler (``QuotaScheduler``) about the inference load."""

    def on_arrival(self, prompt_tokens: int, now: float, lora: bool = False) -> None: ...

    def on_tokens(self, gaps_s: list[float]) -> None: ...

    def on_request_done(self, first_s: float, last_s: float, n_tokens: int) -> None: ...


class Frontend:
    def __init__(self, sock: zmq.Socket[Any], cfg: HarliConfig, metrics: Metrics, *,
                 send_decode: Callable[[DaemonToDecode], bool],
                 decode_running: Callable[[], bool],
                 decode_incarnation: Callable[[], int],
                 runtime: Callable[[], RuntimeInfo | None],
                 accepting: Callable[[], bool],
                 observer: RequestObserver,
                 clock: Callable[[], float],
                 resolve_model: Callable[[str | None], LoraTarget | None] = lambda _: None,
                 on_loras_loaded: Callable[[list[int]], None] = lambda _: None) -> None:
        self.sock = sock
        self.cfg = cfg
        self.metrics = metrics
        self.send_decode = send_decode
        self.decode_running = decode_running  # READY and past start_secs
        self.decode_incarnation = decode_incarnation
        self.runtime = runtime  # what the running decode reported in Ready (None before)
        self.accepting = accepting  # False once the daemon drains: new requests are refused
        self.observer = observer
        self.clock = clock
        # A request's model -> the adapter decode serves it with (UnknownModel: refused).
        self.resolve_model = resolve_model
        self.on_loras_loaded = on_loras_loaded  # decode's loaded adapters, when they change
        self.requests = RequestTable()
        self._client_decoder = ClientDecoder()
        self._handlers: dict[type[Any], Callable[[bytes, Any], None]] = {
            Generate: self._on_generate, Abort: self._on_abort, Hello: self._on_hello}

    # -- commands from the daemon ------------------------------------------------------------

    def drain(self) -> None:
        for client, frames, payload in router_batch(self.sock):
            try:
                self._on_client_frames(client, frames, payload)
            except Exception:  # a client's message must never kill the loop
                logger.exception("[frontend] internal error handling a client message")
                self._reply(client, Error(request_id=request_id_of(payload),
                                          code=ErrorCode.INTERNAL,
                                          message="internal error; see the daemon log"))

    def dispatch_pending(self) -> None:
        """Hand every request still waiting for decode to it (decode has just become ready)."""
        for req in self.requests.pending():
            # Accepted before the model's length was known (model.max_model_len = 0).
            too_long = self._length_error(req.request, req.num_prompt_tokens)
            if too_long is not None:
                self._fail(req, ErrorCode.INVALID, too_long)
                continue
            self._dispatch(req)

    def fail_pending(self, code: str, message: str) -> None:
        for req in self.requests.pending():
            self._fail(req, code, message)

    def on_decode_exit(self, ev: ChildExited) -> None:
        """Fail the requests the dead decode incarnation was serving."""
        lost = self.requests.of_incarnation(ev.incarnation)
        if lost:
            logger.error("[daemon] failing %d in-flight requests of decode[%d]", len(lost),
                         ev.incarnation)
        for req in lost:
            self._fail(req, ErrorCode.DECODE_DIED,
                       f"the decode process died ({describe_returncode(ev.returncode)}) after "
                       f"{req.num_tokens} tokens of this request; it is being restarted, retry")

    def finish_all(self, reason: str) -> None:
        """End every request: decode aborts those it has, each client gets a last chunk."""
        leftover = list(self.requests)
        if leftover:
            logger.info("[shutdown] aborting %d unfinished requests", len(leftover))
            self.send_decode(AbortRequests(rids=[r.rid for r in leftover if r.incarnation]))
            for req in leftover:
                self._finish(req, reason)

    def end_adapter_requests(self, name: str) -> int:
        """End every request served with adapter ``name`` (it is being removed with
        ``--force``): decode aborts those it has; each client gets a last chunk with
        ``finish_reason == "adapter_removed"``. Returns how many ended."""
        ended = self.requests.of_adapter(name)
        if ended:
            self.send_decode(AbortRequests(rids=[r.rid for r in ended if r.incarnation]))
            for req in ended:
                self._finish(req, "adapter_removed")
        return len(ended)

    def on_step_outputs(self, msg: StepOutputs) -> None:
        if msg.loras_loaded is not None:
            self.on_loras_loaded(msg.loras_loaded)
        for rej in msg.rejected:
            req = self.requests.get(rej.rid)
            if req is not None and req.incarnation == msg.incarnation:
                self._fail(req, ErrorCode.REJECTED, rej.message)
        # One ZMQ message per client per iteration, one frame per chunk: a client streaming
        # 32 requests wakes once per iteration, not 32 times.
        frames: dict[bytes, list[bytes]] = {}
        gaps_s: list[float] = []  # this iteration's inter-token gaps, for the SLO
        for out in msg.outputs:
            req = self.requests.get(out.rid)
            if req is None or req.incarnation != msg.incarnation:
                continue  # finished, aborted or failed already; or from a dead incarnation
            if out.num_prompt_tokens > 0 and req.num_prompt_tokens is None:
                # A text prompt's first output: its length is known only now.
                req.num_prompt_tokens = out.num_prompt_tokens
                too_long = self._length_error(req.request, out.num_prompt_tokens)
                if too_long is not None:
                    if not out.finished:
                        self.send_decode(AbortRequests(rids=[req.rid]))
                    self._fail(req, ErrorCode.INVALID, too_long)
                    continue
            new_tokens = sum(len(c.token_ids) for c in out.completions)
            if new_tokens:
                self._on_tokens(req, new_tokens, msg.end_wall_s, gaps_s)
            req.num_tokens += new_tokens
            if out.finished:
                self.requests.remove(req.rid)
                # The request's reason: its first completion's (n == 1: its only one).
                reason = next((c.finish_reason for c in out.completions if c.finish_reason),
                              "stop")
                self.metrics.requests.labels(reason).inc()
                if req.first_token_s is not None and req.last_token_s is not None:
                    self.observer.on_request_done(req.first_token_s, req.last_token_s,
                                                  req.num_tokens)
            parts = frames.setdefault(req.client, [])
            last = len(out.completions) - 1
            for k, c in enumerate(out.completions):
                parts.append(encode(Chunk(
                    request_id=req.request_id, token_ids=c.token_ids, text=c.text,
                    token_times_s=[msg.end_wall_s] * len(c.token_ids),
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    num_prompt_tokens=req.num_prompt_tokens, logprobs=c.logprobs,
                    index=c.index, finished=out.finished and k == last,
                    cumulative_logprob=c.cumulative_logprob,
                    prompt_logprobs=out.prompt_logprobs if k == 0 else None,
                    num_cached_tokens=out.num_cached_tokens,
                    num_cache_creation_tokens=out.num_cache_creation_tokens)))
        if gaps_s:
            self.observer.on_tokens(gaps_s)  # once per iteration: the policy's budget too
        for client, parts in frames.items():
            self._send_frames(client, parts)

    # -- replies -----------------------------------------------------------------------------

    def _reply(self, client: bytes, msg: Chunk | Error | Welcome) -> bool:
        return self._send_frames(client, [encode(msg)])

    def _send_frames(self, client: bytes, frames: list[bytes]) -> bool:
        try:
            self.sock.send_multipart([client, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:
            if e.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                self._on_client_gone(client)
                return False
            raise

    # -- clients -----------------------------------------------------------------------------

    def _on_client_frames(self, client: bytes, frames: list[bytes], payload: bytes) -> None:
        if len(frames) != 2:
            self._reply(client, Error(request_id=None, code=ErrorCode.MALFORMED,
                                      message=f"expected exactly one frame from a DEALER, got "
                                              f"{len(frames) - 1}"))
            return
        limit = self.cfg.endpoints.max_message_bytes
        if len(payload) > limit:
            self._reply(client, Error(request_id=request_id_of(payload),
                                      code=ErrorCode.TOO_LARGE,
                                      message=f"message of {len(payload)} bytes exceeds the "
                                              f"limit of {limit} bytes "
                                              f"(endpoints.max_message_bytes)"))
            return
        try:
            msg: ClientMessage = self._client_decoder.decode(payload)
        except DecodeFailure as e:
            logger.info("[frontend] refused a message: %s", e.message)
            self._reply(client, Error(request_id=request_id_of(payload), code=e.code,
                                      message=e.message))
            return
        handler = self._handlers.get(type(msg))
        if handler is None:  # a client message type this daemon does not serve
            logger.error("[frontend] no handler for %s", type(msg).__name__)
            self._reply(client, Error(request_id=request_id_of(payload),
                                      code=ErrorCode.UNKNOWN_TYPE,
                                      message=f"this daemon does not handle "
                                              f"{type(msg).__name__} messages"))
            return
        handler(client, msg)

    def _on_hello(self, client: bytes, msg: Hello) -> None:
        if msg.protocol_version != PROTOCOL_VERSION:
            self._reply(client, Error(request_id=None, code=ErrorCode.PROTOCOL_VERSION,
                                      message=f"client speaks protocol {msg.protocol_version}, "
                                              f"this daemon speaks {PROTOCOL_VERSION}"))
            return
        info = self.runtime()
        self._reply(client, Welcome(
            protocol_version=PROTOCOL_VERSION, server_version=harli.__version__,
            ready=self.decode_running(),
            model=info.model if info else str(self.cfg.model_path),
            max_model_len=info.max_model_len if info else self.cfg.model.max_model_len,
            max_message_bytes=self.cfg.endpoints.max_message_bytes))

    def _on_generate(self, client: bytes, msg: Generate) -> None:
        def refuse(code: str, text: str) -> None:
            self._reply(client, Error(request_id=msg.request_id, code=code, message=text))

        if not self.accepting():
            refuse(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down; no new requests")
            return
        if (msg.prompt is None) == (msg.prompt_token_ids is None):
            refuse(ErrorCode.INVALID, "exactly one of `prompt` and `prompt_token_ids` is needed")
            return
        if msg.prompt_token_ids is not None and not msg.prompt_token_ids:
            refuse(ErrorCode.INVALID, "`prompt_token_ids` is empty")
            return
        if has_sampling_params(msg):
            problem = sampling_problem(msg)
            if problem is not None:
                refuse(ErrorCode.INVALID, problem)
                return
        n_prompt = len(msg.prompt_token_ids) if msg.prompt_token_ids is not None else None
        too_long = self._length_error(msg, n_prompt)
        if too_long is not None:
            refuse(ErrorCode.INVALID, too_long)
            return
        try:
            lora = self.resolve_model(msg.model)
        except UnknownModel as e:
            refuse(ErrorCode.UNKNOWN_MODEL, str(e))
            return
        try:
            req = self.requests.add(client, msg, time.time())
        except DuplicateRequest:
            refuse(ErrorCode.DUPLICATE_REQUEST,
                   f"request_id {msg.request_id!r} is already in flight for this client")
            return
        req.lora = lora
        if self.decode_running():
            self._dispatch(req)
        # else: pending until decode_proc is READY (first start or restart)

    def _on_abort(self, client: bytes, msg: Abort) -> None:
        req = self.requests.lookup(client, msg.request_id)
        if req is None:
            self._reply(client, Error(request_id=msg.request_id, code=ErrorCode.UNKNOWN_REQUEST,
                                      message=f"no request {msg.request_id!r} in flight for "
                                              f"this client"))
            return
        if req.incarnation is None:
            self._finish(req, "abort")
        else:
            self.send_decode(AbortRequests(rids=[req.rid]))  # decode replies with the end

    def _on_client_gone(self, client: bytes) -> None:
        gone = self.requests.of_client(client)
        if gone:
            logger.info("[frontend] client went away; aborting its %d requests", len(gone))
            self.send_decode(AbortRequests(rids=[r.rid for r in gone if r.incarnation]))
            for r in gone:
                self.requests.remove(r.rid)  # decode's abort output finds it gone

    # -- request lifecycle -------------------------------------------------------------------

    def _max_model_len(self) -> int | None:
        """Prompt + output tokens the served model takes: what the running decode reported,
        else the configured value (decode passes it to vLLM), else unknown (0: the model's
        own, known once decode is ready)."""
        info = self.runtime()
        if info is not None:
            return info.max_model_len
        return self.cfg.model.max_model_len or None

    def _length_error(self, g: Generate, prompt_tokens: int | None) -> str | None:
        """Why ``g.max_tokens`` does not fit beside its prompt, or None (it fits, or that is
        not known yet). vLLM's engine would stop such a request at the model's length with
        ``finish_reason`` "length", silently short of ``max_tokens``; vLLM's OpenAI server
        refuses it instead, and so does the daemon, in the same words. ``prompt_tokens`` is
        None for a text prompt before decode has tokenized it: then only ``max_tokens`` with
        no room for even a one-token prompt is known to be too many. A prompt longer than the
        model is left to the engine (``rejected``), which names its length."""
        limit = self._max_model_len()
        max_tokens = max_tokens_of(g)
        if limit is None or max_tokens is None:  # None: up to the model's length
            return None
        if prompt_tokens is None:
            if max_tokens < limit:
                return None
            return (f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {max_tokens} tokens in the completion (max_tokens), which "
                    f"leaves no room for the prompt. Please reduce max_tokens.")
        if prompt_tokens >= limit or prompt_tokens + max_tokens <= limit:
            return None
        return (f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                f"prompt, {max_tokens} in the completion). Please reduce max_tokens to at "
                f"most {limit - prompt_tokens}.")

    def _dispatch(self, req: Inflight) -> None:
        if self.send_decode(AddRequest(rid=req.rid, request=req.request,
                                       arrival_s=req.arrival_s, lora=req.lora)):
            req.incarnation = self.decode_incarnation()
            # A text prompt is not tokenized here; its length in characters bounds its tokens
            # from above, and the iteration's token budget caps both.
            g = req.request
            n = len(g.prompt_token_ids) if g.prompt_token_ids is not None else \
                len(g.prompt or "")
            self.observer.on_arrival(n, self.clock(), req.lora is not None)

    def _on_tokens(self, req: Inflight, n: int, end_wall_s: float,
                   gaps_s: list[float]) -> None:
        """Token times for the SLO: the engine's iteration end, one gap per new token (added
        to ``gaps_s``)."""
        if req.first_token_s is None:
            req.first_token_s = end_wall_s
        elif req.last_token_s is not None:
            gaps_s.append(end_wall_s - req.last_token_s)
            gaps_s.extend([0.0] * (n - 1))
        req.last_token_s = end_wall_s

    def _finish(self, req: Inflight, reason: str) -> None:
        self.requests.remove(req.rid)
        self._reply(req.client, Chunk(request_id=req.request_id, token_ids=[],
                                      finish_reason=reason, finished=True,
                                      num_prompt_tokens=req.num_prompt_tokens))

    def _fail(self, req: Inflight, code: str, message: str) -> None:
        self.requests.remove(req.rid)
        self.metrics.requests.labels(code).inc()
        self._reply(req.client, Error(request_id=req.request_id, code=code, message=message))
