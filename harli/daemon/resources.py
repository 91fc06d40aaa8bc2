"""``DaemonResources``: what the daemon holds that the OS must get back, behind one ``close()``.

That is the memory arena shared with both children, the ZMQ context with its eight sockets
(the public inference and control ROUTERs, decode's input PUSH and output PULL, the telemetry
SUB, the finetune's input PUSH and output PULL, the HTTP front's output PULL), and the HTTP
API's listening TCP socket. ``close()`` (also run by a
finalizer, should the owner never call it) releases them in order, and at most once.
"""

from __future__ import annotations

import logging
import os
import socket
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from harli.arena.cuda import CudaArena
from harli.arena.shm import Arena, ShmArena, remove_stale_arenas
from harli.config import ConfigError, HarliConfig
from harli.ipc import curve
from harli.ipc.codec import encode
from harli.ipc.decode import DaemonToDecode
from harli.ipc.endpoints import INTERNAL_SOCKET_MODE, PUBLIC_SOCKET_MODE, set_socket_mode
from harli.ipc.finetune import DaemonToFinetune

logger = logging.getLogger(__name__)

# Messages up to this multiple of max_message_bytes reach us and get a typed "too_large" reply;
# libzmq drops the connection of a peer that sends more (ZMQ_MAXMSGSIZE), before we see it.
HARD_LIMIT_FACTOR = 4
# On close, the public ROUTERs get this long to deliver their last replies; the internal
# sockets none (a child that is gone reads nothing).
_PUBLIC_LINGER_MS = 500


def open_arena(cfg: HarliConfig, cuda_host: bool) -> Arena | None:
    if not cfg.memory.arena:
        return None
    if cuda_host:
        # Device memory shared by a CUDA IPC handle (cuda-python; the daemon loads no torch).
        # Its CUDA context is created here, before the MPS control daemon starts, so it is not
        # an MPS client; IPC between MPS and non-MPS contexts is supported on Volta and later
        # (MPS doc, "Application Considerations").
        return CudaArena.create(cfg.arena_bytes, cfg.memory.page_bytes)
    # Earlier versions named the arena harli-<pid>-arena, and a SIGKILLed daemon left it.
    removed = remove_stale_arenas()
    if removed:
        logger.info("[daemon] removed arenas of dead daemons: %s", removed)
    # Unnamed: the memory goes when the last process holding or mapping the file exits, so
    # even a SIGKILLed daemon leaves nothing in /dev/shm. The daemon keeps the descriptor;
    # each child inherits it at every (re)start (ChildSpecs.pass_fds).
    arena = ShmArena.create(f"harli-{os.getpid()}-arena", cfg.arena_bytes,
                            cfg.memory.page_bytes)
    logger.info("[daemon] arena: %.2f GiB in %d pages, an unnamed /dev/shm file (fd %d)",
                cfg.arena_bytes / 2**30, arena.handle.num_pages, arena.handle.fd)
    return arena


class DaemonResources:
    def __init__(self, cfg: HarliConfig, cuda_host: bool) -> None:
        # Closed first in close(), which the daemon calls only after both children have
        # exited: a CUDA arena's creator must outlive its importers (cudaFree before their
        # cudaIpcCloseMemHandle is undefined).
        self.arena = open_arena(cfg, cuda_host)
        self.ctx = zmq.Context()
        # Filled as they are made, so that a failure half-way releases what exists.
        self._sockets: list[tuple[zmq.Socket[Any], int]] = []  # with their linger at close
        self._authenticators: list[Any] = []  # CURVE client-key checks (tcp:// endpoints)
        self._paths: list[str] = []  # bound endpoints; ipc:// ones are unlinked at close
        self._listeners: list[socket.socket] = []  # the HTTP API's, inherited by http_proc
        self._finalizer = weakref.finalize(self, _release, self.arena, self.ctx, self._sockets,
                                           self._authenticators, self._paths, self._listeners)
        try:
            self._open_sockets(cfg)
        except BaseException:
            self.close()
            raise

    def _socket(self, kind: int, linger_ms: int = 0) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        self._sockets.append((sock, linger_ms))
        return sock

    def _open_sockets(self, cfg: HarliConfig) -> None:
        limit = HARD_LIMIT_FACTOR * cfg.endpoints.max_message_bytes
        self.inference = self._socket(zmq.ROUTER, _PUBLIC_LINGER_MS)
        self.inference.setsockopt(zmq.MAXMSGSIZE, limit)
        # Fail fast (EHOSTUNREACH) on a reply to a client that has gone, so its requests are
        # aborted instead of generating for nobody.
        self.inference.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.inference.setsockopt(zmq.SNDHWM, 100_000)
        self.inference.setsockopt(zmq.LINGER, 1000)
        self.decode_in = self._socket(zmq.PUSH)
        self.decode_in.setsockopt(zmq.SNDHWM, 100_000)
        self.decode_in.setsockopt(zmq.LINGER, 0)
        self.decode_out = self._socket(zmq.PULL)
        self.telemetry = self._socket(zmq.SUB)
        self.telemetry.setsockopt(zmq.SUBSCRIBE, b"")
        self.control = self._socket(zmq.ROUTER, _PUBLIC_LINGER_MS)
        self.control.setsockopt(zmq.MAXMSGSIZE, limit)
        self.control.setsockopt(zmq.LINGER, 500)
        self.finetune_in = self._socket(zmq.PUSH)
        self.finetune_in.setsockopt(zmq.LINGER, 0)
        self.finetune_out = self._socket(zmq.PULL)
        self.http_out = self._socket(zmq.PULL)
        ep_cfg = cfg.endpoints
        for sock, ep in ((self.inference, cfg.inference_endpoint),
                         (self.control, cfg.control_endpoint)):
            if ep.startswith("tcp://"):
                curve.apply_server(sock, ep_cfg.curve_server_key)
                if ep_cfg.curve_authorized_keys and not self._authenticators:
                    self._authenticators.append(
                        curve.start_authenticator(self.ctx, ep_cfg.curve_authorized_keys))
        for sock, ep, mode in (
                (self.inference, cfg.inference_endpoint, PUBLIC_SOCKET_MODE),
                (self.control, cfg.control_endpoint, PUBLIC_SOCKET_MODE),
                (self.decode_in, cfg.internal_endpoint("decode-in"), INTERNAL_SOCKET_MODE),
                (self.decode_out, cfg.internal_endpoint("decode-out"), INTERNAL_SOCKET_MODE),
                (self.finetune_in, cfg.internal_endpoint("finetune-in"), INTERNAL_SOCKET_MODE),
                (self.finetune_out, cfg.internal_endpoint("finetune-out"),
                 INTERNAL_SOCKET_MODE),
                (self.http_out, cfg.internal_endpoint("http-out"), INTERNAL_SOCKET_MODE)):
            sock.bind(ep)
            self._paths.append(ep)
            # Whatever the umask: the public sockets 0660, so the service's group can connect
            # (systemd's UMask=0027 would leave 0750, and connecting needs write permission);
            # the internal ones 0600, the daemon's user only. The runtime dir's own mode still
            # decides who reaches them at all; this is defence in depth.
            set_socket_mode(ep, mode)
        # decode_proc binds the telemetry PUB (so any local observer running as the daemon's
        # user can subscribe; it makes the socket 0600 too); ZMQ reconnects to the same path
        # across decode restarts.
        self.telemetry.connect(cfg.internal_endpoint("telemetry"))
        self._paths.append(cfg.internal_endpoint("telemetry"))
        self._poller = zmq.Poller()
        for s in (self.inference, self.decode_out, self.telemetry, self.control,
                  self.finetune_out, self.http_out):
            self._poller.register(s, zmq.POLLIN)
        logger.info("[daemon] serving inference on %s", cfg.inference_endpoint)
        self.http_listener = listen_http(cfg) if cfg.http.port else None
        if self.http_listener is not None:
            self._listeners.append(self.http_listener)

    def poll(self, timeout_ms: int) -> dict[zmq.Socket[Any], int]:
        """The sockets with input waiting, after at most ``timeout_ms``."""
        return dict(self._poller.poll(timeout=timeout_ms))

    def send_decode(self, msg: DaemonToDecode) -> bool:
        try:
            self.decode_in.send(encode(msg), zmq.NOBLOCK)
            return True
        except zmq.Again:  # decode_proc not connected (yet); the caller retries
            return False

    def send_finetune(self, msg: DaemonToFinetune) -> bool:
        try:
            self.finetune_in.send(encode(msg), zmq.NOBLOCK)
            return True
        except zmq.Again:  # finetune_proc not connected (yet)
            return False

    def close(self) -> None:
        self._finalizer()


def listen_http(cfg: HarliConfig) -> socket.socket:
    """The HTTP API's listening socket, bound here so that a port in use stops the daemon at
    start (naming it) and http_proc's restarts inherit the same socket."""
    host, port = cfg.http.host, cfg.http.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ConfigError(f"http.port: cannot listen on {host}:{port} ({e.strerror}); choose "
                          f"another port or set http.port = 0") from None
    sock.set_inheritable(True)
    return sock


def _release(arena: Arena | None, ctx: zmq.Context[Any],
             sockets: Sequence[tuple[zmq.Socket[Any], int]], authenticators: Sequence[Any],
             paths: Sequence[str], listeners: Sequence[socket.socket] = ()) -> None:
    # Module-level and given only the resources, so that the finalizer does not keep the
    # owner alive.
    if arena is not None:
        arena.close()  # shm: closes the daemon's descriptor; no name to unlink
    for sock, linger_ms in sockets:
        sock.close(linger=linger_ms)
    for auth in authenticators:
        auth.stop()
    for listener in listeners:
        listener.close()
    ctx.term()
    for ep in paths:
        if ep.startswith("ipc://"):
            Path(ep[len("ipc://"):]).unlink(missing_ok=True)
