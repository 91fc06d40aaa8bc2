"""``DecodeProc``: the decode process's transport and loop around ``DecodeEngine``.

Sockets (all ipc:// in the runtime dir, bound by the daemon except telemetry):

* ``decode-in``  PULL  <- daemon PUSH: ``AddRequest`` / ``AbortRequests`` / ``Shutdown``
* ``decode-out`` PUSH  -> daemon PULL: ``Ready``, one ``StepOutputs`` per iteration, ``Fatal``
* ``telemetry``  PUB (bound here): one ``IterationTelemetry`` per iteration, for the daemon and
  any local observer (bench, profiler)

ZMQ IO runs on two threads that feed queues; the main loop never touches a socket
(``drain inputs -> step -> emit``), like vLLM's ``EngineCoreProc``.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import traceback
from typing import Any

import zmq

from harli.config import HarliConfig
from harli.decode_proc.engine import DecodeEngine
from harli.ipc.codec import DecodeFailure, Decoder, encode
from harli.ipc.messages import (
    AbortRequests,
    AddRequest,
    DaemonToDecode,
    Fatal,
    Ready,
    Shutdown,
    StepOutputs,
)

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.1
_OUT_STOP = object()


class DecodeProc:
    def __init__(self, cfg: HarliConfig, incarnation: int) -> None:
        self.cfg = cfg
        self.incarnation = incarnation
        self._inputs: queue.Queue[DaemonToDecode] = queue.Queue()
        self._outputs: queue.Queue[Any] = queue.Queue()
        self._stop_reason: str | None = None
        self._ctx = zmq.Context()
        self._init_sockets()
        self._threads = [
            threading.Thread(target=self._input_thread, name="decode-in", daemon=True),
            threading.Thread(target=self._output_thread, name="decode-out", daemon=True),
        ]
        for t in self._threads:
            t.start()
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

    # -- IO threads --------------------------------------------------------------------------

    def _input_thread(self) -> None:
        decoder: Decoder[DaemonToDecode] = Decoder(DaemonToDecode)
        while True:
            try:
                data = self._in.recv(copy=False)
            except zmq.ContextTerminated:
                return
            try:
                self._inputs.put(decoder.decode(data.buffer))
            except DecodeFailure as e:  # only our daemon talks here; log, never die of it
                logger.error("[decode] dropped undecodable message from daemon: %s", e)

    def _output_thread(self) -> None:
        while True:
            item = self._outputs.get()
            if item is _OUT_STOP:
                return
            sock, msg = item
            try:
                sock.send(encode(msg))
            except zmq.ZMQError as e:
                logger.error("[decode] send failed: %s", e)

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: only enqueues a message."""
        self._inputs.put(Shutdown(reason=reason))

    # -- loop --------------------------------------------------------------------------------

    def run(self) -> None:
        self.engine = DecodeEngine(self.cfg, self.incarnation)
        self._outputs.put((self._out, Ready(incarnation=self.incarnation, pid=os.getpid(),
                                            info=self.engine.info)))
        while self._stop_reason is None:
            self._drain_inputs()
            self._step()
        logger.info("[shutdown] decode: %s; aborting %d live requests",
                    self._stop_reason, self.engine.num_live)
        self.engine.abort_all()
        self._step()

    def _drain_inputs(self) -> None:
        assert self.engine is not None
        block = not self.engine.has_work()
        while True:
            try:
                msg = self._inputs.get(block=block, timeout=_IDLE_WAIT_S if block else None)
            except queue.Empty:
                return
            block = False
            self._handle(msg)

    def _handle(self, msg: DaemonToDecode) -> None:
        assert self.engine is not None
        if isinstance(msg, AddRequest):
            rejected = self.engine.add(msg.rid, msg.request, msg.arrival_s)
            if rejected is not None:
                self._emit_step([], rejected=[rejected], end_wall_s=0.0)
        elif isinstance(msg, AbortRequests):
            self.engine.abort(msg.rids)
        elif isinstance(msg, Shutdown):
            self._stop_reason = msg.reason

    def _step(self) -> None:
        assert self.engine is not None
        if not self.engine.has_work():
            return
        result = self.engine.step()
        if result.outputs:
            self._emit_step(result.outputs, rejected=[], end_wall_s=result.end_wall_s)
        if result.telemetry is not None:
            self._outputs.put((self._pub, result.telemetry))

    def _emit_step(self, outputs: list[Any], rejected: list[Any], end_wall_s: float) -> None:
        assert self.engine is not None
        self._outputs.put((self._out, StepOutputs(
            incarnation=self.incarnation, iteration=self.engine.iteration,
            end_wall_s=end_wall_s, outputs=outputs, rejected=rejected)))

    def report_fatal(self, exc: BaseException) -> None:
        self._outputs.put((self._out, Fatal(incarnation=self.incarnation, error=repr(exc),
                                            traceback=traceback.format_exc())))

    def close(self) -> None:
        self._outputs.put(_OUT_STOP)
        self._threads[1].join(timeout=5)
        for s in (self._out, self._pub, self._in):
            s.close(linger=None)
        self._ctx.term()


def run_decode_proc(cfg: HarliConfig, incarnation: int) -> int:
    """Entry of the decode process; returns its exit code."""
    from harli.ipc.process import configure_logging, die_with_parent, set_title

    die_with_parent()
    set_title(f"harli::decode[{incarnation}]")
    configure_logging("decode", cfg.daemon.log_level)
    proc = DecodeProc(cfg, incarnation)
    signal.signal(signal.SIGTERM, lambda *_: proc.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: proc.request_stop("SIGINT"))
    code = 0
    try:
        proc.run()
    except Exception as e:
        logger.exception("[decode] fatal error")
        proc.report_fatal(e)
        code = 1
    finally:
        proc.close()
    return code


