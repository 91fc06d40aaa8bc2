"""``HttpProc``: the HTTP front's process. One uvicorn server on the listening socket the
daemon made (so a restart of this process never races another program for the port), the
app of ``app.py``, and the lifecycle messages to the daemon (``HttpReady`` once the app has
reached the daemon, ``HttpFatal`` when it cannot serve).
"""

from __future__ import annotations

import asyncio
import logging
import os
import traceback
from typing import Any

import zmq

from harli.config import HarliConfig
from harli.http_proc.auth import ApiKeys
from harli.ipc.codec import encode
from harli.ipc.http import HttpFatal, HttpReady

logger = logging.getLogger(__name__)


class HttpProc:
    def __init__(self, cfg: HarliConfig, incarnation: int, listen_fd: int) -> None:
        self.cfg = cfg
        self.incarnation = incarnation
        self.listen_fd = listen_fd
        self._ctx = zmq.Context()
        self._out = self._ctx.socket(zmq.PUSH)
        self._out.setsockopt(zmq.LINGER, 2000)
        self._out.connect(cfg.internal_endpoint("http-out"))

    @property
    def url(self) -> str:
        host = self.cfg.http.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.cfg.http.port}"

    def run(self) -> int:
        try:
            asyncio.run(self._serve())
            return 0
        except Exception as e:
            logger.exception("[http] cannot serve")
            self._send(HttpFatal(incarnation=self.incarnation, error=str(e),
                                 traceback=traceback.format_exc()))
            return 1
        finally:
            self._out.close()
            self._ctx.term()

    async def _serve(self) -> None:
        import uvicorn

        from harli.http_proc.app import Limits, build_front, vllm_body_models
        from harli.http_proc.daemon_link import DaemonLink
        from harli.http_proc.server_limits import ServerLimits, fit_open_files, server_config

        keys = ApiKeys.from_file(self.cfg.http.api_keys_file)
        link = DaemonLink(self.cfg)
        try:
            await link.start()
            app: Any = await build_front(self.cfg, link)
            limits = ServerLimits.from_config(self.cfg.http)
            fit_open_files(limits.max_connections)
            # Connection limits (head timeout and size, open connections) are the protocol's
            # (server_limits.py); uvicorn's limit_concurrency stays unset, as it counts
            # connections still sending their head.
            server = uvicorn.Server(server_config(
                Limits(app, keys, self.cfg.http.max_body_bytes,
                       self.cfg.http.max_concurrent_requests, vllm_body_models(),
                       self.cfg.http.open_probes),
                limits, fd=self.listen_fd, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5, lifespan="on"))
            app.state.server = server  # vLLM's engine-error handler reads it
            ready = asyncio.create_task(self._ready_when_started(server))
            await server.serve()
            ready.cancel()
        finally:
            await link.close()

    async def _ready_when_started(self, server: Any) -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        self._ready()

    def _ready(self) -> None:
        logger.info("[http] OpenAI-compatible API on %s", self.url)
        self._send(HttpReady(incarnation=self.incarnation, pid=os.getpid(), url=self.url))

    def _send(self, msg: HttpReady | HttpFatal) -> None:
        try:
            self._out.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("[http] the daemon's socket is not there; %s not sent",
                           type(msg).__name__)
