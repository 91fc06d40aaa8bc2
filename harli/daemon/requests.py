"""The daemon's table of inference requests it has accepted and not yet finished.

Pure bookkeeping (no sockets): a request is known by the client's ``(identity, request_id)``
and by the engine-wide ``rid`` the daemon gives it, so two clients may use the same
``request_id``. A request is *pending* until it has been handed to a decode incarnation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from harli.ipc.decode import LoraTarget
from harli.ipc.inference import Generate


class DuplicateRequest(Exception):
    pass


@dataclass
class Inflight:
    rid: str
    client: bytes
    request: Generate
    arrival_s: float
    incarnation: int | None = None  # the decode incarnation serving it; None while pending
    num_tokens: int = 0
    # Known at once for a token-id prompt; for a text prompt, from decode's first output (only
    # decode tokenizes). Decode's own abort output carries 0, so a last chunk after an abort
    # takes it from here.
    num_prompt_tokens: int | None = None
    first_token_s: float | None = None  # engine wall time of the first / latest token
    last_token_s: float | None = None
    lora: LoraTarget | None = None  # the adapter serving it (None: the base model)

    @property
    def request_id(self) -> str:
        return self.request.request_id


class RequestTable:
    def __init__(self) -> None:
        self._by_rid: dict[str, Inflight] = {}
        self._by_key: dict[tuple[bytes, str], Inflight] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._by_rid)

    def __iter__(self) -> Iterator[Inflight]:
        return iter(list(self._by_rid.values()))

    def add(self, client: bytes, request: Generate, arrival_s: float) -> Inflight:
        key = (client, request.request_id)
        if key in self._by_key:
            raise DuplicateRequest(request.request_id)
        req = Inflight(rid=f"r{next(self._ids)}", client=client, request=request,
                       arrival_s=arrival_s)
        if request.prompt_token_ids is not None:
            req.num_prompt_tokens = len(request.prompt_token_ids)
        self._by_rid[req.rid] = req
        self._by_key[key] = req
        return req

    def get(self, rid: str) -> Inflight | None:
        return self._by_rid.get(rid)

    def lookup(self, client: bytes, request_id: str) -> Inflight | None:
        return self._by_key.get((client, request_id))

    def pending(self) -> list[Inflight]:
        return [r for r in self._by_rid.values() if r.incarnation is None]

    def of_incarnation(self, incarnation: int) -> list[Inflight]:
        return [r for r in self._by_rid.values() if r.incarnation == incarnation]

    def of_client(self, client: bytes) -> list[Inflight]:
        return [r for r in self._by_rid.values() if r.client == client]

    def of_adapter(self, name: str) -> list[Inflight]:
        return [r for r in self._by_rid.values() if r.lora is not None and r.lora.name == name]

    def by_model(self) -> dict[str | None, int]:
        """Requests in flight per adapter name (None: the base model)."""
        counts: dict[str | None, int] = {}
        for r in self._by_rid.values():
            key = r.lora.name if r.lora is not None else None
            counts[key] = counts.get(key, 0) + 1
        return counts

    def remove(self, rid: str) -> Inflight | None:
        req = self._by_rid.pop(rid, None)
        if req is not None:
            del self._by_key[(req.client, req.request_id)]
        return req
