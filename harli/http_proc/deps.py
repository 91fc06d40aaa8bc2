"""What Harli's routes share, as FastAPI dependencies: the front's state (``State``: the
configuration and the daemon link) and the owner of the request's API key (``Owner``, set by
``Limits`` before any route runs)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from harli.config import HarliConfig
from harli.http_proc.daemon_link import DaemonLink


class HttpState:
    """The configuration and the daemon link (a stand-in in tests)."""

    def __init__(self, cfg: HarliConfig, link: DaemonLink) -> None:
        self.cfg = cfg
        self.link = link


def _state(request: Request) -> HttpState:
    state: HttpState = request.app.state.harli
    return state


def _owner(request: Request) -> str:
    """The owner id the key check gave the request ("" when no keys are configured)."""
    owner: str = request.scope.get("state", {}).get("owner", "")
    return owner


State = Annotated[HttpState, Depends(_state)]
Owner = Annotated[str, Depends(_owner)]
