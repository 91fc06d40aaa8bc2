"""Invariants of the daemon's bookkeeping, checked by several of its unit tests."""

from __future__ import annotations

from harli.daemon.ledger import Owner, PageLedger


def assert_ledger_balanced(ledger: PageLedger) -> None:
    """Every page has one owner, and each owner's count is the number of its pages."""
    owners = [ledger.owner(p) for p in range(ledger.num_pages)]
    for owner in Owner:
        assert ledger.count(owner) == owners.count(owner) == len(ledger.pages_of(owner))
