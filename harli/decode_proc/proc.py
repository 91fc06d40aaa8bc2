"""``DecodeProc``: the decode process's transport and loop around ``DecodeEngine``.

Sockets (all ipc:// in the runtime dir, bound by the daemon except telemetry):

* ``decode-in``  PULL  <- daemon PUSH: ``AddRequest`` / ``AbortRequests`` / ``Shutdown`` /
  ``LendBlocks`` / ``ReturnBlocks`` / ``UnloadAdapter``
* ``decode-out`` PUSH  -> daemon PULL: ``Ready``, one ``StepOutputs`` per iteration, ``Fatal``,
  ``BlocksLent`` / ``BlocksReturned``; on CUDA with ``gpu.share_weights``, ``WeightsExported``
  just before ``Ready``
* ``telemetry``  PUB (bound here, mode 0600 like the daemon's internal sockets): one
  ``IterationTelemetry`` per iteration, for the daemon and any local observer (bench,
  profiler) running as the daemon's user

One loop, ``drain inputs -> step -> emit``, like vLLM's ``EngineCoreProc`` but without its
Python IO threads: libzmq already moves bytes on its own I/O thread, and on a CPU host every
extra Python thread contends for the GIL and the core with the engine step (measured: the
serving path cost 13-17 % of vLLM's offline tokens/s with IO threads).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import msgspec
import zmq

from harli.config import HarliConfig
from harli.decode_proc.engine import DecodeEngine, shares_weights
from harli.ipc.codec import Decoder, drain, encode
from harli.ipc.decode import (
    AbortRequests,
    AddRequest,
    BlocksLent,
    BlocksReturned,
    DaemonToDecode,
    Fatal,
    LendBlocks,
    Ready,
    RequestOutput,
    RequestRejected,
    ReturnBlocks,
    Shutdown,
    StepOutputs,
    UnloadAdapter,
)
from harli.ipc.endpoints import INTERNAL_SOCKET_MODE, set_socket_mode

logger = logging.getLogger(__name__)

_IDLE_WAIT_MS = 100


class DecodeProc:
    def __init__(self, cfg: HarliConfig, incarnation: int,
                 arena_base: int | None = None, kv_cache_bytes: int | None = None) -> None:
        self.cfg = cfg
        self.incarnation = incarnation
        self.arena_base = arena_base
        self.kv_cache_bytes = kv_cache_bytes
        self._stop_reason: str | None = None
        self._decoder: Decoder[DaemonToDecode] = Decoder(DaemonToDecode)
        self._ctx = zmq.Context()
        self._init_sockets()
        self.engine: DecodeEngine | None = None

    def _init_sockets(self) -> None:
        self._in = self._ctx.socket(zmq.PULL)
        self._in.connect(self.cfg.internal_endpoint("decode-in"))
        self._out = self._ctx.socket(zmq.PUSH)
        self._out.setsockopt(zmq.LINGER, 2000)
        self._out.connect(self.cfg.internal_endpoint("decode-out"))
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, self.cfg.decode.telemetry_hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(self.cfg.internal_endpoint("telemetry"))
        # Like the daemon's internal sockets: the daemon's user only, whatever the umask.
        set_socket_mode(self.cfg.internal_endpoint("telemetry"), INTERNAL_SOCKET_MODE)

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: only records the request."""
        if self._stop_reason is None:
            self._stop_reason = reason

    # -- loop --------------------------------------------------------------------------------

    def run(self) -> None:
        self.engine = DecodeEngine(self.cfg, self.incarnation, self.arena_base,
                                   self.kv_cache_bytes)
        if shares_weights(self.cfg, self.engine.info.device):
            # Before Ready: the daemon hands the finetune no job until it holds these.
            self._send(self._out, self.engine.export_weights())
        self._send(self._out, Ready(incarnation=self.incarnation, pid=os.getpid(),
                                    info=self.engine.info))
        while self._stop_reason is None:
            self._drain_inputs()
            self._step()
        logger.info("[shutdown] decode: %s; aborting %d live requests",
                    self._stop_reason, self.engine.num_live)
        self.engine.abort_all()
        self._step()

    def _drain_inputs(self) -> None:
        assert self.engine is not None
        # Block (bounded, so a stop request is seen) only when there is nothing to step.
        timeout_ms = 0 if self.engine.has_work() else _IDLE_WAIT_MS
        for msg in drain(self._in, self._decoder, timeout_ms, "decode"):
            self._handle(msg)

    def _handle(self, msg: DaemonToDecode) -> None:
        assert self.engine is not None
        if isinstance(msg, AddRequest):
            rejected = self.engine.add(msg.rid, msg.request, msg.arrival_s, msg.lora)
            if rejected is not None:
                self._emit_step([], rejected=[rejected], end_wall_s=0.0)
        elif isinstance(msg, UnloadAdapter):
            self.engine.unload_adapter(msg.lora_id)
        elif isinstance(msg, AbortRequests):
            self.engine.abort(msg.rids)
        elif isinstance(msg, Shutdown):
            self.request_stop(msg.reason)
        elif isinstance(msg, LendBlocks):
            # Between iterations, so no block can change hands under a running step.
            groups = self.engine.lend_groups(msg.max_groups, msg.blocks_per_group)
            self.engine.lend_seq = msg.seq
            self._send(self._out, BlocksLent(incarnation=self.incarnation, seq=msg.seq,
                                             groups=groups,
                                             kv_blocks_free=self.engine.kv_blocks_free()))
        elif isinstance(msg, ReturnBlocks):
            error, scrub_s = None, 0.0
            try:
                scrub_s = self.engine.return_groups(msg.groups, scrub=msg.scrub)
            except ValueError as e:
                error = str(e)
                logger.error("[decode] ReturnBlocks %d refused: %s", msg.seq, e)
            self.engine.lend_seq = msg.seq
            self._send(self._out, BlocksReturned(
                incarnation=self.incarnation, seq=msg.seq, groups=msg.groups,
                kv_blocks_free=self.engine.kv_blocks_free(), error=error, scrub_s=scrub_s))

    def _step(self) -> None:
        assert self.engine is not None
        if not self.engine.has_work():
            return
        result = self.engine.step()
        if result.outputs:
            self._emit_step(result.outputs, rejected=[], end_wall_s=result.end_wall_s)
        if result.telemetry is not None:
            self._send(self._pub, result.telemetry)

    def _emit_step(self, outputs: list[RequestOutput], rejected: list[RequestRejected],
                   end_wall_s: float) -> None:
        assert self.engine is not None
        loaded = None
        if self.engine.loras_changed:
            self.engine.loras_changed = False
            loaded = self.engine.loaded_loras()
        self._send(self._out, StepOutputs(
            incarnation=self.incarnation, iteration=self.engine.iteration,
            end_wall_s=end_wall_s, outputs=outputs, rejected=rejected, loras_loaded=loaded))

    def _send(self, sock: zmq.Socket[bytes], msg: msgspec.Struct) -> None:
        # A send only queues the bytes for libzmq's own I/O thread; it never waits on the
        # daemon (PUSH/PUB with a high-water mark), so it costs microseconds in the loop.
        try:
            sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            logger.error("[decode] %s queue full; dropped a %s", sock.type,
                         type(msg).__name__)

    def report_fatal(self, exc: BaseException) -> None:
        self._send(self._out, Fatal(incarnation=self.incarnation, error=repr(exc),
                                    traceback=traceback.format_exc()))

    def close(self) -> None:
        for s in (self._out, self._pub, self._in):
            s.close(linger=None)
        self._ctx.term()


def run_decode_proc(cfg: HarliConfig, incarnation: int, cpu_cores: str = "none",
                    arena_json: str = "") -> int:
    """Entry of the decode process; returns its exit code."""
    from harli.config import parse_cpu_list
    from harli.runtime import configure_logging, die_with_parent, pin_to, run_child, set_title

    if not die_with_parent():
        print("harli.decode_proc: the daemon that started it is gone; exiting", file=sys.stderr)
        return 1
    set_title(f"harli::decode[{incarnation}]")
    configure_logging("decode", cfg.daemon.log_level)
    # Before vLLM starts its OpenMP threads, so that they inherit the mask.
    pin_to(None if cpu_cores == "none" else parse_cpu_list(cpu_cores), "decode")
    arena_base = kv_cache_bytes = None
    if arena_json:
        from harli.arena.cuda import open_arena
        from harli.arena.shm import Arena
        from harli.decode_proc import kv_arena
        from harli.ipc.arena import ArenaHandle

        arena: Arena = open_arena(msgspec.json.decode(arena_json, type=ArenaHandle))
        kv_arena.install(arena)
        arena_base = arena.base_address
        if arena.handle.kind == "cuda":
            # vLLM sizes its GPU KV cache from gpu_memory_utilization; it must fit the arena.
            kv_cache_bytes = arena.handle.size_bytes
    return run_child("decode", DecodeProc(cfg, incarnation, arena_base, kv_cache_bytes))


