"""The daemon's request table: keyed per client, pending until dispatched, failed per
incarnation."""

from __future__ import annotations

import pytest

from harli.daemon.requests import DuplicateRequest, RequestTable
from harli.ipc.inference import Generate


def gen(rid: str) -> Generate:
    return Generate(request_id=rid, prompt="x")


def test_same_request_id_from_two_clients_is_two_requests() -> None:
    t = RequestTable()
    a = t.add(b"A", gen("1"), 0.0)
    b = t.add(b"B", gen("1"), 0.0)
    assert a.rid != b.rid and len(t) == 2
    assert t.lookup(b"A", "1") is a and t.lookup(b"B", "1") is b


def test_duplicate_from_one_client_is_refused_until_finished() -> None:
    t = RequestTable()
    r = t.add(b"A", gen("1"), 0.0)
    with pytest.raises(DuplicateRequest):
        t.add(b"A", gen("1"), 0.0)
    assert t.remove(r.rid) is r
    t.add(b"A", gen("1"), 0.0)


def test_pending_and_incarnations() -> None:
    t = RequestTable()
    a, b, c = (t.add(b"A", gen(str(i)), 0.0) for i in range(3))
    a.incarnation = 1
    b.incarnation = 2
    assert t.pending() == [c]
    assert t.of_incarnation(1) == [a]
    assert t.of_client(b"A") == [a, b, c]
    assert t.remove("nope") is None
