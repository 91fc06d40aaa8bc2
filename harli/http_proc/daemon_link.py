"""The HTTP front's link to the daemon: its public inference and control endpoints.

The front is a client of the native protocol like any other, so everything it serves goes
through the daemon's own validation, scheduling and accounting. Control requests are
blocking ZeroMQ request/replies: they run on a worker thread, one at a time, so the event
loop serving streams never waits on one.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from harli.client.control import ControlClient
from harli.client.inference import AsyncInferenceClient, RequestError
from harli.config import HarliConfig
from harli.http_proc.errors import ApiError
from harli.ipc.control import ModelInfo


class DaemonLink:
    def __init__(self, cfg: HarliConfig) -> None:
        self.cfg = cfg
        self.inference = AsyncInferenceClient(cfg.inference_endpoint, timeout_s=600.0)
        self._control = ControlClient(cfg.control_endpoint, timeout_s=60.0)
        self._lock = threading.Lock()
        self.base_model = ""
        self.max_model_len = cfg.model.max_model_len

    async def start(self) -> None:
        """Learn the served model's name and length from the daemon."""
        welcome = await self.inference.hello()
        self.max_model_len = welcome.max_model_len or self.max_model_len
        base = [m for m in await self.models() if m.kind == "base"]
        self.base_model = base[0].name if base else welcome.model

    async def close(self) -> None:
        await self.inference.close()
        self._control.close()

    async def control(self, method: str, *args: Any, **kw: Any) -> Any:
        """``ControlClient.method(*args)`` on the worker thread; the daemon's refusal as an
        ``ApiError`` with its status."""
        def call() -> Any:
            with self._lock:
                return getattr(self._control, method)(*args, **kw)

        try:
            return await asyncio.to_thread(call)
        except RequestError as e:
            raise ApiError.from_daemon(e.code, e.message) from None

    async def models(self) -> list[ModelInfo]:
        models: list[ModelInfo] = await self.control("models")
        return models

    async def ready(self) -> bool:
        """Whether decode serves now (the daemon's answer to Hello)."""
        try:
            welcome = await asyncio.wait_for(self.inference.hello(), 5.0)
        except (TimeoutError, RequestError):
            return False
        return welcome.ready
