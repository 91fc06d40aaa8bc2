"""The arena page ledger: which process owns each page of the shared memory pool.

Pure bookkeeping for the daemon (no torch, no ZMQ, ``now`` passed in). Every page has exactly
one owner: free, decode (vLLM's KV cache) or finetune (leased for activations). Every change
names its reason and is all-or-nothing: a request naming a page that is not in the expected
state is refused with ``LedgerError`` and changes nothing, so a child that claims pages it does
not hold cannot corrupt the books.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Owner(enum.Enum):
    FREE = "free"
    DECODE = "decode"
    FINETUNE = "finetune"


class LedgerError(ValueError):
    """A change the ledger refused; the ledger is unchanged."""


@dataclass(frozen=True)
class LedgerChange:
    seq: int
    time_s: float
    op: str
    pages: tuple[int, ...]
    src: Owner
    dst: Owner
    reason: str


class PageLedger:
    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self._owner = [Owner.FREE] * num_pages
        self._counts = {o: 0 for o in Owner}
        self._counts[Owner.FREE] = num_pages
        self._seq = 0

    @property
    def num_pages(self) -> int:
        return len(self._owner)

    def owner(self, page: int) -> Owner:
        return self._owner[page]

    def count(self, owner: Owner) -> int:
        return self._counts[owner]

    def counts(self) -> dict[str, int]:
        return {o.value: n for o, n in self._counts.items()}

    def pages_of(self, owner: Owner) -> list[int]:
        return [p for p, o in enumerate(self._owner) if o is owner]

    # -- changes ---------------------------------------------------------------------------

    def _move(self, op: str, pages: Iterable[int], src: Owner, dst: Owner, reason: str,
              now: float) -> LedgerChange:
        ps = tuple(pages)
        if not reason.strip():
            raise LedgerError(f"{op}: every change needs a reason")
        if not ps:
            raise LedgerError(f"{op}: no pages given")
        if len(set(ps)) != len(ps):
            raise LedgerError(f"{op}: pages repeated in one request")
        out_of_range = [p for p in ps if not 0 <= p < len(self._owner)]
        if out_of_range:
            raise LedgerError(f"{op}: pages {out_of_range[:8]} outside 0..{len(self._owner) - 1}")
        wrong = [(p, self._owner[p].value) for p in ps if self._owner[p] is not src]
        if wrong:
            raise LedgerError(f"{op}: pages must be {src.value}, but "
                              f"{', '.join(f'{p} is {o}' for p, o in wrong[:8])}"
                              f"{' ...' if len(wrong) > 8 else ''}")
        for p in ps:
            self._owner[p] = dst
        self._counts[src] -= len(ps)
        self._counts[dst] += len(ps)
        self._seq += 1
        return LedgerChange(self._seq, now, op, ps, src, dst, reason)

    def take_for_decode(self, pages: Iterable[int], reason: str, now: float) -> LedgerChange:
        return self._move("take_for_decode", pages, Owner.FREE, Owner.DECODE, reason, now)

    def free_from_decode(self, pages: Iterable[int], reason: str, now: float) -> LedgerChange:
        return self._move("free_from_decode", pages, Owner.DECODE, Owner.FREE, reason, now)

    def lend(self, pages: Iterable[int], reason: str, now: float) -> LedgerChange:
        return self._move("lend", pages, Owner.FREE, Owner.FINETUNE, reason, now)

    def give_back(self, pages: Iterable[int], reason: str, now: float) -> LedgerChange:
        """Leased pages returned (a release by the finetune, or a completed reclaim)."""
        return self._move("give_back", pages, Owner.FINETUNE, Owner.FREE, reason, now)

    def finetune_crashed(self, reason: str, now: float) -> LedgerChange | None:
        """The finetune process is gone: everything it held is free again."""
        held = self.pages_of(Owner.FINETUNE)
        if not held:
            return None
        return self._move("finetune_crashed", held, Owner.FINETUNE, Owner.FREE, reason, now)
