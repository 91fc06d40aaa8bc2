"""OpenAI's cursor pages: ``{"object": "list", "data": [...], "has_more", "first_id",
"last_id"}``, the next page asked for with ``after=<the last id seen>``.

Lists here are small (a key's files and jobs, a job's events), so a page is cut from the whole
list the daemon returns rather than by a query per page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from harli.http_proc.errors import bad_field

T = TypeVar("T")


def check_limit(limit: int, most: int) -> int:
    if not 1 <= limit <= most:
        raise bad_field("limit", f"Invalid value for 'limit': {limit}; expected 1 to {most}")
    return limit


def page(items: Sequence[T], id_of: Callable[[T], str], after: str | None, limit: int,
         as_object: Callable[[T], dict[str, Any]]) -> dict[str, Any]:
    """The ``limit`` items following the one whose id is ``after`` (from the start without
    it; none when no item has that id: a cursor past a deleted item ends the list rather than
    starting it again), in the order given."""
    start = 0
    if after is not None:
        ids = [id_of(x) for x in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    chosen = items[start:start + limit]
    data = [as_object(x) for x in chosen]
    return {"object": "list", "data": data, "has_more": start + limit < len(items),
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}
