"""JSON bodies read as text: a lone UTF-16 surrogate is refused as malformed JSON.

A JSON body is read as text: a string in it that holds a lone UTF-16 surrogate (the escape
``"\\ud800"``, which Python's ``json`` reads) is refused as malformed JSON, since it could be
neither tokenized nor sent to the daemon nor written back in a reply. Harli's own routes
(files, fine-tuning) read their bodies through ``TextJsonRoute``; vLLM's routes get the same
check from ``Limits`` before they run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: Any) -> str | None:
    """Where the first string of a parsed JSON value (a key or a value) that holds a lone
    UTF-16 surrogate is (``messages.0.content``); None when none does."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return f"`{path}`" if path else "the body"
        elif isinstance(v, dict):
            for key, item in v.items():
                if _SURROGATE.search(key):
                    return f"a key of `{path}`" if path else "a key of the body"
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), item) for i, item in enumerate(v))
    return None


class TextJsonRequest(Request):
    """A request whose JSON body must be text: a lone surrogate is a ``JSONDecodeError``,
    which FastAPI answers as malformed JSON (400)."""

    async def json(self) -> Any:
        value = await super().json()
        where = lone_surrogate(value)
        if where is not None:
            raise json.JSONDecodeError(f"{where} holds a lone UTF-16 surrogate (\\ud800 to "
                                       f"\\udfff), which is not text", "", 0)
        return value


class TextJsonRoute(APIRoute):
    """The route class of every router of the front: its handlers read ``TextJsonRequest``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(TextJsonRequest(request.scope, request.receive))

        return route
