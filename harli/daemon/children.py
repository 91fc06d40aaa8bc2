"""The daemon's children as the OS sees them: which cores they run on, their command lines
and their environment.

``CorePlan`` gives decode cores of its own (``decode.cpu_cores``), keeps the daemon off them,
and describes the finetune's CPU levels on what is left, for the fence that moves the
finetune's threads off decode's cores when its level drops. ``ChildSpecs`` turns the config,
that plan, the arena and MPS into the supervised ``Child`` objects (decode, the finetune, the
HTTP front); with finetuning off the finetune is a ``NullChild``, and so is the HTTP front with
``http.port`` 0.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from harli.config import HarliConfig, child_environ
from harli.cpu_plan import CpuLevels, cpu_levels
from harli.daemon.disabled import NullChild
from harli.daemon.mps import MpsControl, terminate_hook
from harli.daemon.supervisor import Child, ProcessOps
from harli.ipc.arena import ArenaHandle
from harli.runtime import DAEMON_PID_VAR, decode_cores, format_cpu_list, pin_to

# Read by decode_proc (proc.run_decode_proc) and finetune_proc (__main__), which may not import
# this package, so they spell it out.
DAEMON_PID_ENV = DAEMON_PID_VAR  # read by runtime.die_with_parent in each child


@dataclass(frozen=True)
class CorePlan:
    allowed: frozenset[int]  # the daemon's CPU affinity at start
    decode: frozenset[int]  # decode's own cores; empty: decode is not pinned
    # The finetune's levels on the cores decode leaves it, with its top levels spilling onto
    # decode's; None where its quota is not cores (GPU hosts: SMs) or decode is not pinned.
    fence: CpuLevels | None

    @classmethod
    def for_host(cls, cfg: HarliConfig, cuda_host: bool) -> CorePlan:
        allowed = os.sched_getaffinity(0)
        decode = frozenset(decode_cores(cfg.decode.cpu_cores, cfg.decode.cpu_threads, allowed)
                           or ())
        fence = cpu_levels(cfg.finetune.levels, cfg.finetune.max_threads, frozenset(allowed),
                           decode) if decode and not cuda_host else None
        return cls(frozenset(allowed), decode, fence)

    def pin_daemon(self) -> None:
        # The decode engine gets its cores to itself; the daemon's per-token routing runs on
        # the others, so that it never preempts an engine step (measured on 2 cores: unpinned,
        # an iteration took 10-20 % longer while the daemon and clients streamed its tokens).
        if self.decode:
            pin_to(set(self.allowed - self.decode) or None, "daemon")

    def dominated_by(self, cfg: HarliConfig, cuda_host: bool) -> list[int | None]:
        """Levels that only idle more than a higher one on the same threads and cores, which
        are not worth a rate trial (CPU hosts; a GPU level's SMs differ at every level).
        Without a fence decode is unpinned: the finetune's quota spans the same cores."""
        if cuda_host:
            return []
        levels = self.fence or cpu_levels(cfg.finetune.levels, cfg.finetune.max_threads,
                                          self.allowed, frozenset())
        return levels.dominated_by()

    def spills(self, cfg: HarliConfig, cuda_host: bool) -> list[bool]:
        """Levels whose threads run on decode's cores (CPU hosts with decode pinned): tried
        last by ``LevelRates``."""
        if cuda_host or self.fence is None:
            return []
        return self.fence.spills()


class ChildSpecs:
    """Command lines and environments of decode_proc and finetune_proc."""

    def __init__(self, cfg: HarliConfig, cores: CorePlan, arena: ArenaHandle | None,
                 mps: MpsControl | None, ops: ProcessOps) -> None:
        self.cfg = cfg
        self.ops = ops
        self._mps = mps
        self._config_json = cfg.to_json().decode()
        self._arena_json = msgspec.json.encode(arena).decode() if arena is not None else ""
        # The CPU arena is an unnamed file: each child maps the daemon's descriptor of it,
        # inherited at every (re)start under the number the handle names.
        self._pass_fds = (arena.fd,) if arena is not None and arena.fd >= 0 else ()
        self._decode_cores = format_cpu_list(set(cores.decode))
        # Under MPS, terminate_client before any signal, so no GPU work is in flight when it
        # lands.
        self._before_signal = terminate_hook(mps) if mps is not None else None

    def decode(self, may_start: Callable[[], bool]) -> Child:
        """``may_start``: a restart waits while it says no (the memory pool's say)."""
        return Child("decode", self.decode_argv, self.env("decode"), self.cfg.supervisor,
                     self.ops, may_start=may_start, before_signal=self._before_signal,
                     pass_fds=self._pass_fds)

    def finetune(self) -> Child | NullChild:
        if not self.cfg.finetune.enabled:
            return NullChild("finetune")
        return Child("finetune", self.finetune_argv, self.env("finetune"), self.cfg.supervisor,
                     self.ops, before_signal=self._before_signal, pass_fds=self._pass_fds)

    def http(self, listener: socket.socket | None) -> Child | NullChild:
        """The HTTP front, given the listening socket the daemon bound (None: http.port 0)."""
        if listener is None:
            return NullChild("http")
        fd = listener.fileno()
        return Child("http", lambda n: self.http_argv(n, fd), self.env("http"),
                     self.cfg.supervisor, self.ops, pass_fds=(fd,))

    def http_argv(self, incarnation: int, fd: int) -> list[str]:
        return [sys.executable, "-m", "harli.http_proc", "--incarnation", str(incarnation),
                "--config-json", self._config_json, "--listen-fd", str(fd)]

    def decode_argv(self, incarnation: int) -> list[str]:
        return [sys.executable, "-m", "harli.decode_proc", "--incarnation", str(incarnation),
                "--config-json", self._config_json, "--cpu-cores", self._decode_cores,
                "--arena", self._arena_json]

    def finetune_argv(self, incarnation: int) -> list[str]:
        return [sys.executable, "-m", "harli.finetune_proc", "--incarnation", str(incarnation),
                "--config-json", self._config_json, "--arena", self._arena_json,
                "--decode-cores", self._decode_cores]

    def env(self, role: str) -> dict[str, str]:
        env = child_environ(self.cfg, role)
        # The child checks, once its parent-death signal is armed, that its parent is still
        # this daemon: one that died before that would otherwise leave it running, holding the
        # arena's descriptor, with nobody to end it.
        env[DAEMON_PID_ENV] = str(os.getpid())
        # vLLM's statistics as decode's engine records them, in files the daemon's metrics
        # page reads (``DecodeVllmMetrics``); any other process keeps its own registry.
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if role == "decode":
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.cfg.vllm_metrics_dir)
        return self._mps.client_env(env, role) if self._mps is not None else env
