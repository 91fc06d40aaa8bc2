"""``QuotaController``: the one owner of the finetune's quota ``Decision``.

The scheduler decides the level; this object holds the ``Decision`` in force, numbers each new
one, sends it to the finetune (at once while the finetune is ready, else when it becomes
ready) and, on a CPU host where decode has cores of its own, fences the finetune's threads off
decode's cores the moment the level drops. The job manager only reads the decision, to tell
a job that starts running from one that starts paused.

No sockets here: the daemon gives it a ``send`` callable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from harli.config import FinetuneConfig
from harli.cpu_plan import CpuLevels
from harli.daemon.disabled import NullChild
from harli.daemon.metrics import Metrics
from harli.daemon.supervisor import Child, ChildState
from harli.ipc.finetune import DaemonToFinetune, Decision

logger = logging.getLogger(__name__)


class QuotaController:
    def __init__(self, cfg: FinetuneConfig, send: Callable[[DaemonToFinetune], bool],
                 finetune: Child | NullChild, cpu_fence: CpuLevels | None,
                 metrics: Metrics) -> None:
        self.levels = cfg.levels
        self.decision = Decision(level=cfg.level, admitted=cfg.level > 0, seq=1)
        self._send = send
        self._finetune = finetune
        # The finetune's CPU levels as the finetune computes them (see CpuLevels.fence); None
        # where a level is not a set of cores (GPU hosts: SMs) or decode is not pinned.
        self._cpu_fence = cpu_fence
        self._metrics = metrics
        self._finetune_ready = False
        metrics.finetune_quota_level.set_function(lambda: float(self.decision.level))

    @property
    def level(self) -> int:
        return self.decision.level

    def set_level(self, level: int) -> None:
        """A new quota level for the finetune (0 pauses it); sent at once."""
        if not 0 <= level <= self.levels:
            raise ValueError(f"level must be 0..{self.levels}, got {level}")
        before = self.decision.level
        if level == before:
            return
        self.decision = Decision(level=level, admitted=level > 0, seq=self.decision.seq + 1)
        logger.info("[quota] finetune quota level -> %d", level)
        if self._finetune_ready:
            self._send(self.decision)
        if level < before:
            self._fence(before, level)

    def level_in_force(self, job_running: bool) -> int:
        """The level the finetune trains at (0 when no job is training)."""
        d = self.decision
        return d.level if d.admitted and job_running else 0

    def on_finetune_ready(self) -> None:
        """A finetune incarnation is ready: it learns the decision before any job."""
        self._finetune_ready = True
        self._send(self.decision)

    def on_finetune_exit(self) -> None:
        self._finetune_ready = False

    def _fence(self, before: int, level: int) -> None:
        # The finetune re-applies its level only at its next micro-step boundary (0.1-0.3 s
        # away on CPU, a whole burst of decode iterations): move its threads now instead.
        proc = self._finetune.proc
        if (self._cpu_fence is not None and proc is not None
                and self._finetune.state is ChildState.RUNNING
                and self._cpu_fence.fence(proc.pid, before, level)):
            self._metrics.cpu_fences.inc()
