"""The HTTP front's link to the daemon: its public inference and control endpoints.

The front is a client of the native protocol like any other, so everything it serves goes
through the daemon's own validation, scheduling and accounting. Control requests are typed
(``call(ShowJob(job_id=1), JobDetail)``) and asynchronous, many in flight on one connection,
matched to their replies by request id: a slow one (an attach) delays no other route.
"""

from __future__ import annotations

import asyncio

from harli.client.control import AsyncControlClient, R
from harli.client.inference import AsyncInferenceClient, RequestError
from harli.config import HarliConfig
from harli.http_proc.errors import ApiError
from harli.ipc.control import ControlRequest, ListModels, ModelInfo, ModelList


class DaemonLink:
    def __init__(self, cfg: HarliConfig) -> None:
        self.cfg = cfg
        self.inference = AsyncInferenceClient(cfg.inference_endpoint, timeout_s=600.0)
        self.control = AsyncControlClient(cfg.control_endpoint, timeout_s=60.0)
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
        await self.control.close()

    async def call(self, msg: ControlRequest, expect: type[R]) -> R:
        """The daemon's reply to ``msg``; its refusal as an ``ApiError`` with its status."""
        try:
            return await self.control.call(msg, expect)
        except RequestError as e:
            raise ApiError.from_daemon(e.code, e.message) from None

    async def models(self) -> list[ModelInfo]:
        return (await self.call(ListModels(), ModelList)).models

    async def ready(self) -> bool:
        """Whether decode serves now (the daemon's answer to Hello)."""
        try:
            welcome = await asyncio.wait_for(self.inference.hello(), 5.0)
        except (TimeoutError, RequestError):
            return False
        return welcome.ready
