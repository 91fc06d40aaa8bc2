"""``ActivationLease``: the finetune's saved activations kept in arena pages the daemon lends.

The daemon lends the finetune process a set of arena pages (a lease) and takes them back only
between micro-steps. Inside ``micro_step()`` autograd's saved tensors (what a forward keeps for
its backward) are copied into those pages through ``saved_tensors_hooks``, so the trainer's
activation memory comes out of memory the daemon can hand to decode again once the micro-step
is over. What does not fit stays in private memory and is counted, so the share of activations
that really lives in the lease is a measured number, not an assumption.

Layout: the held pages are coalesced into extents (runs of consecutive pages) and each extent
is a bump allocator (64-byte aligned). Nothing is freed one by one: the backward of a
micro-step consumes all of its saved tensors, so the whole lease is empty again at its end.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from harli.arena.shm import Arena, consecutive_runs

ALIGN_BYTES = 64  # cache line; also a multiple of every dtype's itemsize


@dataclass(frozen=True)
class LeaseStats:
    """What one micro-step saved for its backward, and where it went.

    Every saved tensor is counted once (a tensor saved twice is deduplicated), and tiny ones
    (scalars, masks) count like any other, so ``lease_saved_bytes / saved_bytes`` is the
    honest share of activation bytes held by the lease.
    """

    lease_bytes: int  # size of the lease during the micro-step
    lease_saved_bytes: int  # activations copied into the lease
    private_saved_bytes: int  # activations kept in private memory (no room, no lease, device)
    skipped_bytes: int  # saved tensors that are parameters or buffers, not activations
    fallback_tensors: int  # activations kept in private memory, whatever the reason
    peak_used_bytes: int  # lease bytes in use at the peak, alignment padding included

    @property
    def saved_bytes(self) -> int:
        return self.lease_saved_bytes + self.private_saved_bytes


EMPTY_STATS = LeaseStats(0, 0, 0, 0, 0, 0)


def combine_stats(stats: Sequence[LeaseStats]) -> LeaseStats:
    """Stats of several passes as one: bytes and fallbacks add up; the lease size and the peak
    are maxima (passes run one after the other, each starting from an empty lease)."""
    return LeaseStats(
        lease_bytes=max((s.lease_bytes for s in stats), default=0),
        lease_saved_bytes=sum(s.lease_saved_bytes for s in stats),
        private_saved_bytes=sum(s.private_saved_bytes for s in stats),
        skipped_bytes=sum(s.skipped_bytes for s in stats),
        fallback_tensors=sum(s.fallback_tensors for s in stats),
        peak_used_bytes=max((s.peak_used_bytes for s in stats), default=0),
    )


@dataclass(frozen=True)
class _InLease:
    """A packed saved tensor: its copy in the lease, valid only in the micro-step ``epoch``."""

    view: torch.Tensor
    epoch: int


class _Extent:
    """A run of consecutive pages with its own bump pointer."""

    __slots__ = ("end", "start", "top")

    def __init__(self, start: int, nbytes: int) -> None:
        self.start = start
        self.end = start + nbytes
        self.top = start


def _align(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


class ActivationLease:
    """Arena pages lent to the finetune, used to hold autograd's saved activations.

    ``grant`` / ``take_back`` change the lease between micro-steps only. The backward of every
    forward run inside ``micro_step()`` must also run inside it: at its end the lease is reset,
    and a saved tensor unpacked later raises instead of reading reused memory.

    ``take_back`` zeroes the pages it gives back that a micro-step wrote: they return to vLLM
    as KV blocks, and its CPU attention reads a sequence's whole last block before masking the
    unused slots, so one NaN pattern left there (an int64 index, say) poisons every token.
    Zeroing here keeps that cost off decode's iteration path.
    """

    def __init__(self, arena: Arena | None, page_bytes: int) -> None:
        if page_bytes <= 0 or page_bytes % ALIGN_BYTES:
            raise ValueError(f"page_bytes must be a positive multiple of {ALIGN_BYTES}, "
                             f"got {page_bytes}")
        if arena is not None and arena.handle.page_bytes != page_bytes:
            raise ValueError(f"page_bytes {page_bytes} differs from the arena's "
                             f"{arena.handle.page_bytes}")
        self._arena = arena
        self._page_bytes = page_bytes
        self._pages: set[int] = set()
        self._dirty: set[int] = set()  # held pages a micro-step wrote into
        self._extents: list[_Extent] = []
        # Arena views live on one device; a saved tensor elsewhere stays private (copying it
        # across would be offloading, which is not this class's job).
        self._device = arena.tensor(0, ALIGN_BYTES).device if arena is not None else None
        self._active = False
        self._epoch = 0  # bumps at every micro-step end; older packed handles are stale
        self._last = EMPTY_STATS

    # -- the lease ------------------------------------------------------------------------------

    @property
    def pages(self) -> list[int]:
        return sorted(self._pages)

    @property
    def lease_bytes(self) -> int:
        return len(self._pages) * self._page_bytes

    def grant(self, pages: list[int]) -> None:
        self._refuse_while_active("grant pages")
        if self._arena is None and pages:
            raise ValueError(f"cannot grant pages {sorted(pages)} to a lease without an arena")
        num_pages = self._arena.handle.num_pages if self._arena is not None else 0
        bad = sorted(p for p in set(pages) if not 0 <= p < num_pages)
        if bad:
            raise ValueError(f"pages {bad} outside the arena's 0..{num_pages - 1}")
        held = sorted(self._pages.intersection(pages))
        if held or len(set(pages)) != len(pages):
            dup = held or sorted({p for p in pages if pages.count(p) > 1})
            raise ValueError(f"pages {dup} are already held or granted twice")
        self._pages.update(pages)
        self._rebuild_extents()

    def take_back(self, pages: list[int]) -> int:
        """Give ``pages`` back, zeroing those a micro-step wrote; returns the bytes zeroed (on
        CUDA the zeroing has finished on the device when this returns)."""
        self._refuse_while_active("take back pages")
        missing = sorted(set(pages) - self._pages)
        if missing:
            raise ValueError(f"pages {missing} are not held by this lease")
        zeroed = self._zero(sorted(self._dirty.intersection(pages)))
        self._dirty.difference_update(pages)
        self._pages.difference_update(pages)
        self._rebuild_extents()
        return zeroed

    def _zero(self, pages: list[int]) -> int:
        if not pages or self._arena is None:
            return 0
        pb = self._page_bytes
        for start, end in consecutive_runs(pages):
            self._arena.tensor(start * pb, (end - start) * pb).zero_()
        if self._device is not None and self._device.type == "cuda":
            # The pages go to another process next: the memset must be done, not queued.
            torch.cuda.synchronize(self._device)
        return len(pages) * pb

    def _mark_dirty(self) -> None:
        pb = self._page_bytes
        for e in self._extents:
            if e.top > e.start:
                self._dirty.update(range(e.start // pb, (e.top - 1) // pb + 1))

    def _refuse_while_active(self, what: str) -> None:
        if self._active:
            raise RuntimeError(f"cannot {what} during a micro-step; pages change only "
                               f"between micro-steps")

    def _rebuild_extents(self) -> None:
        # Consecutive pages are adjacent bytes, so a run of them holds tensors larger than a page.
        pb = self._page_bytes
        self._extents = [_Extent(start * pb, (end - start) * pb)
                         for start, end in consecutive_runs(self._pages)]

    @property
    def used_bytes(self) -> int:
        return sum(e.top - e.start for e in self._extents)

    def _allocate(self, nbytes: int) -> int | None:
        # First fit over the extents: a tensor too big for what is left of one extent may still
        # fit a later one, and smaller tensors after it may still fill the first.
        for e in self._extents:
            off = _align(e.top)
            if off + nbytes <= e.end:
                e.top = off + nbytes
                return off
        return None

    def _reset(self) -> None:
        for e in self._extents:
            e.top = e.start

    # -- stats ----------------------------------------------------------------------------------

    @property
    def last_stats(self) -> LeaseStats:
        """Stats of the last finished micro-step."""
        return self._last

    # -- the micro-step -------------------------------------------------------------------------

    @contextlib.contextmanager
    def micro_step(self, skip: Iterable[torch.Tensor] = ()) -> Iterator[None]:
        """Forward and backward of one pass run in here, with saved activations in the lease.

        ``skip``: the model's parameters and buffers. Autograd saves those too (a linear layer
        saves its weight), but they are not activations: they are returned as they are and
        counted as ``skipped_bytes``. Stats are in ``last_stats`` once the block ends.
        """
        self._refuse_while_active("start a micro-step")
        skip_ptrs = {p for t in skip if (p := t.untyped_storage().data_ptr())}
        use_lease = self._arena is not None and bool(self._extents)
        arena = self._arena
        epoch = self._epoch
        # key -> (weak ref to the saved tensor, packed value or None when it stayed private)
        seen: dict[tuple[Any, ...], tuple[weakref.ref[torch.Tensor], _InLease | None]] = {}
        counts = {"lease": 0, "private": 0, "skipped": 0, "fallbacks": 0}

        def pack(t: torch.Tensor) -> Any:
            if t.layout != torch.strided or t.numel() == 0:
                return t
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
                   t._version)
            hit = seen.get(key)
            # The weak ref tells a second save of the same tensor from a new tensor that the
            # allocator placed at a freed address: while the first is alive its memory is not
            # reused, and the version in the key tells an in-place change apart.
            if hit is not None and hit[0]() is not None:
                return hit[1] if hit[1] is not None else t
            nbytes = t.numel() * t.element_size()
            packed: _InLease | None = None
            if storage.data_ptr() in skip_ptrs:
                counts["skipped"] += nbytes
            elif use_lease and arena is not None and t.device == self._device and (
                    (off := self._allocate(nbytes)) is not None):
                view = arena.tensor(off, nbytes, t.dtype).view(t.shape)
                with torch.no_grad():
                    view.copy_(t)
                packed = _InLease(view, epoch)
                counts["lease"] += nbytes
            else:
                counts["private"] += nbytes
                counts["fallbacks"] += 1
            seen[key] = (weakref.ref(t), packed)
            return packed if packed is not None else t

        def unpack(h: Any) -> torch.Tensor:
            if isinstance(h, _InLease):
                if h.epoch != self._epoch:
                    raise RuntimeError("a saved activation was unpacked after its micro-step "
                                       "ended; run backward inside ActivationLease.micro_step()")
                return h.view
            return h  # type: ignore[no-any-return]  # a private tensor, returned as saved

        self._active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            stats = LeaseStats(
                lease_bytes=self.lease_bytes,
                lease_saved_bytes=counts["lease"], private_saved_bytes=counts["private"],
                skipped_bytes=counts["skipped"], fallback_tensors=counts["fallbacks"],
                peak_used_bytes=self.used_bytes)
            self._mark_dirty()
            self._reset()
            seen.clear()
            self._epoch += 1
            self._active = False
            self._last = stats
