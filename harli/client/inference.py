"""``InferenceClient`` (sync) and ``AsyncInferenceClient``: streaming generation over ZeroMQ.

One DEALER socket per client; many requests may be in flight on it at once, and replies are
routed to each request's stream by ``request_id``. A client object is not thread-safe: use one
per thread (or one async client per event loop). The wire protocol is in ``docs/protocol.md``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, TypedDict

import msgspec
import zmq
import zmq.asyncio

from harli.ipc import curve, endpoints
from harli.ipc.codec import DecodeFailure, Decoder, encode
from harli.ipc.inference import (
    PROTOCOL_VERSION,
    Abort,
    Chunk,
    Error,
    Generate,
    Hello,
    ServerMessage,
    TokenLogprob,
    Welcome,
)

DEFAULT_TIMEOUT_S = 120.0


class CurveKeys(TypedDict):
    """The CURVE certificates a client presents on a tcp:// endpoint (None on ipc://)."""

    server_key: str | None
    client_key: str | None


class RequestError(Exception):
    """The daemon refused or failed a request; ``code`` is an ``ErrorCode`` value."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass
class Completion:
    """A whole generation, gathered from its chunks."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    token_times_s: list[float] = field(default_factory=list)  # when the engine produced each
    recv_times_s: list[float] = field(default_factory=list)  # when this client received each
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int | None = None
    sent_s: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # A request of ``n`` completions: this one is index 0, the others by their index.
    others: dict[int, Completion] = field(default_factory=dict)

    def add(self, chunk: Chunk, recv_s: float) -> None:
        if chunk.index:
            other = self.others.setdefault(chunk.index, Completion(self.request_id,
                                                                   sent_s=self.sent_s))
            other.add(msgspec.structs.replace(chunk, index=0), recv_s)
            return
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs
        self.logprobs.extend(chunk.logprobs or ())
        if chunk.cumulative_logprob is not None:
            self.cumulative_logprob = chunk.cumulative_logprob
        self.token_ids.extend(chunk.token_ids)
        self.text += chunk.text
        self.token_times_s.extend(chunk.token_times_s)
        self.recv_times_s.extend([recv_s] * len(chunk.token_ids))
        if chunk.num_prompt_tokens is not None:
            self.num_prompt_tokens = chunk.num_prompt_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.stop_reason = chunk.stop_reason

    @property
    def ttft_s(self) -> float | None:
        return self.recv_times_s[0] - self.sent_s if self.recv_times_s else None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first, from the engine's timestamps."""
        t = self.token_times_s
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


_ids = itertools.count(1)


def build_generate(prompt: str | list[int], *, request_id: str | None = None,
                   max_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = -1, seed: int | None = None, stop: list[str] | None = None,
                   stop_token_ids: list[int] | None = None, ignore_eos: bool = False,
                   detokenize: bool = True, model: str | None = None,
                   logprobs: int | None = None,
                   sampling_params: dict[str, Any] | msgspec.Raw | None = None) -> Generate:
    """A ``Generate``: the flat sampling fields, or vLLM's ``SamplingParams`` fields as a map
    in ``sampling_params`` (then the flat ones must stay at their defaults)."""
    rid = request_id or f"{os.getpid()}-{uuid.uuid4().hex[:8]}-{next(_ids)}"
    text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
    if isinstance(sampling_params, msgspec.Raw):  # encoded already (vLLM's encoder)
        raw = sampling_params
    else:
        raw = msgspec.Raw(msgspec.msgpack.encode(sampling_params))
    return Generate(request_id=rid, prompt=text, prompt_token_ids=ids, max_tokens=max_tokens,
                    temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                    stop=list(stop or []), stop_token_ids=list(stop_token_ids or []),
                    ignore_eos=ignore_eos, detokenize=detokenize, model=model,
                    logprobs=logprobs, sampling_params=raw)


def _error(msg: Error) -> RequestError:
    return RequestError(msg.code, msg.message, msg.request_id)


class _Router:
    """Per-request inboxes shared by the sync and async clients."""

    def __init__(self) -> None:
        self.inboxes: dict[str | None, collections.deque[tuple[ServerMessage, float]]] = {}
        self.decoder: Decoder[ServerMessage] = Decoder(ServerMessage)

    def route(self, frames: list[bytes]) -> set[str | None]:
        """File each frame of one reply (one server message per frame) into its stream's
        inbox; return the inboxes that got something."""
        recv_s = time.time()
        touched: set[str | None] = set()
        for data in frames:
            try:
                msg = self.decoder.decode(data)
            except DecodeFailure as e:
                raise RequestError(e.code,
                                   f"undecodable reply from the daemon: {e.message}") from None
            key = None if isinstance(msg, Welcome) else msg.request_id
            if key not in self.inboxes:
                if isinstance(msg, Chunk):
                    continue  # the tail of a stream its reader has closed
                key = None  # a reply for no open stream (e.g. an error about a bad message)
            self.inboxes.setdefault(key, collections.deque()).append((msg, recv_s))
            touched.add(key)
        return touched


class InferenceClient:
    """Blocking client. ``generate`` returns an iterator of ``Chunk``; ``complete`` gathers it."""

    def __init__(self, endpoint: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 ctx: zmq.Context[Any] | None = None, server_key: str | None = None,
                 client_key: str | None = None) -> None:
        """``endpoint``: None finds the local daemon as the CLI does (``harli.ipc.endpoints``);
        ``server_key``: the daemon's public CURVE certificate (tcp:// endpoints);
        ``client_key``: this client's secret certificate when the daemon authorizes keys."""
        endpoint = endpoint or endpoints.default_inference_endpoint()
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = ctx or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if server_key:
            curve.apply_client(self._sock, server_key, client_key)
        self._sock.connect(endpoint)
        self._router = _Router()
        self.welcome: Welcome | None = None

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, payload: bytes) -> None:
        """Send bytes as they are (tests, debugging); replies land in the shared inbox."""
        self._router.inboxes.setdefault(None, collections.deque())
        self._sock.send(payload)

    def _next(self, key: str | None) -> tuple[ServerMessage, float]:
        box = self._router.inboxes[key]
        deadline = time.monotonic() + self.timeout_s
        while not box:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(left * 1000):
                raise RequestError("timeout", f"no reply from {self.endpoint} within "
                                   f"{self.timeout_s:.0f} s", key)
            while True:
                try:
                    self._router.route(self._sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
        return box.popleft()

    def recv_unattributed(self) -> ServerMessage:
        """The next reply that belongs to no open stream (errors about bad messages)."""
        self._router.inboxes.setdefault(None, collections.deque())
        return self._next(None)[0]

    def hello(self) -> Welcome:
        self.send_raw(encode(Hello(protocol_version=PROTOCOL_VERSION, client="harli-py")))
        msg = self.recv_unattributed()
        if isinstance(msg, Error):
            raise _error(msg)
        assert isinstance(msg, Welcome)
        self.welcome = msg
        return msg

    def generate(self, prompt: str | list[int], **kw: Any) -> Iterator[Chunk]:
        req = build_generate(prompt, **kw)
        self._submit(req)
        return self._stream(req.request_id)

    def _submit(self, req: Generate) -> None:
        payload = encode(req)
        if self.welcome and len(payload) > self.welcome.max_message_bytes:
            raise RequestError("too_large", f"request of {len(payload)} bytes exceeds the "
                               f"daemon's limit of {self.welcome.max_message_bytes}",
                               req.request_id)
        self._router.inboxes[req.request_id] = collections.deque()
        self._sock.send(payload)

    def _stream(self, request_id: str) -> Iterator[Chunk]:
        try:
            while True:
                msg, _ = self._next(request_id)
                if isinstance(msg, Error):
                    raise _error(msg)
                assert isinstance(msg, Chunk)
                yield msg
                if msg.finished:
                    return
        finally:
            self._router.inboxes.pop(request_id, None)

    def complete(self, prompt: str | list[int], **kw: Any) -> Completion:
        req = build_generate(prompt, **kw)
        out = Completion(request_id=req.request_id, sent_s=time.time())
        self._submit(req)
        box_key = req.request_id
        try:
            while True:
                msg, recv_s = self._next(box_key)
                if isinstance(msg, Error):
                    raise _error(msg)
                assert isinstance(msg, Chunk)
                out.add(msg, recv_s)
                if msg.finished:
                    return out
        finally:
            self._router.inboxes.pop(box_key, None)

    def abort(self, request_id: str) -> None:
        """Abort a request of this client. Its stream ends with ``finish_reason="abort"``;
        an id this client has no stream for raises the daemon's ``unknown_request`` error."""
        known = request_id in self._router.inboxes
        self._sock.send(encode(Abort(request_id=request_id)))
        if not known:
            self._router.inboxes[request_id] = collections.deque()
            try:
                msg, _ = self._next(request_id)
            finally:
                self._router.inboxes.pop(request_id, None)
            if isinstance(msg, Error):
                raise _error(msg)


class AsyncInferenceClient:
    """asyncio client: ``async for chunk in client.generate(...)``; many requests at once."""

    def __init__(self, endpoint: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 server_key: str | None = None, client_key: str | None = None) -> None:
        endpoint = endpoint or endpoints.default_inference_endpoint()
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if server_key:
            curve.apply_client(self._sock, server_key, client_key)
        self._sock.connect(endpoint)
        self._router = _Router()
        self._waiters: dict[str | None, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None
        self._reader_error: BaseException | None = None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._sock.close(linger=0)

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                frames = await self._sock.recv_multipart()
                for key in self._router.route(frames):
                    ev = self._waiters.get(key)
                    if ev is not None:
                        ev.set()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # surface to every waiting stream
            self._reader_error = e
            for ev in self._waiters.values():
                ev.set()

    async def _next(self, key: str | None) -> tuple[ServerMessage, float]:
        box = self._router.inboxes[key]
        ev = self._waiters.setdefault(key, asyncio.Event())
        while not box:
            if self._reader_error is not None:
                raise self._reader_error
            ev.clear()
            try:
                await asyncio.wait_for(ev.wait(), self.timeout_s)
            except TimeoutError:
                raise RequestError("timeout", f"no reply from {self.endpoint} within "
                                   f"{self.timeout_s:.0f} s", key) from None
        return box.popleft()

    async def hello(self) -> Welcome:
        self._ensure_reader()
        self._router.inboxes.setdefault(None, collections.deque())
        await self._sock.send(encode(Hello(protocol_version=PROTOCOL_VERSION,
                                           client="harli-py-async")))
        msg, _ = await self._next(None)
        if isinstance(msg, Error):
            raise _error(msg)
        assert isinstance(msg, Welcome)
        return msg

    async def generate(self, prompt: str | list[int], **kw: Any) -> AsyncIterator[Chunk]:
        req = build_generate(prompt, **kw)
        self._ensure_reader()
        self._router.inboxes[req.request_id] = collections.deque()
        try:
            await self._sock.send(encode(req))
            while True:
                msg, _ = await self._next(req.request_id)
                if isinstance(msg, Error):
                    raise _error(msg)
                assert isinstance(msg, Chunk)
                yield msg
                if msg.finished:
                    return
        finally:
            self._router.inboxes.pop(req.request_id, None)
            self._waiters.pop(req.request_id, None)

    async def complete(self, prompt: str | list[int], **kw: Any) -> Completion:
        kw.setdefault("request_id", build_generate("", **{}).request_id)
        out = Completion(request_id=kw["request_id"], sent_s=time.time())
        async for chunk in self.generate(prompt, **kw):
            out.add(chunk, time.time())
        return out

    async def cancel(self, request_id: str) -> None:
        """Abort a request whose stream this client no longer reads: the abort is sent, and
        the daemon's last chunk for it is dropped on arrival."""
        await self._sock.send(encode(Abort(request_id=request_id)))

    async def abort(self, request_id: str) -> None:
        self._ensure_reader()
        known = request_id in self._router.inboxes
        await self._sock.send(encode(Abort(request_id=request_id)))
        if not known:
            self._router.inboxes[request_id] = collections.deque()
            try:
                msg, _ = await self._next(request_id)
            finally:
                self._router.inboxes.pop(request_id, None)
                self._waiters.pop(request_id, None)
            if isinstance(msg, Error):
                raise _error(msg)
