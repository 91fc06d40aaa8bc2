"""Stand-ins for the parts of the daemon that the configuration turns off.

With ``finetune.enabled = false`` there is no finetune process and no quota to schedule; with
``memory.arena = false`` there is no memory pool to lend from. The daemon then holds one of
these null objects in that part's place and calls it like the real one: every event is
ignored, ``status()`` has nothing to show, and no branch on "is it there?" is needed.
"""

from __future__ import annotations

from collections.abc import Callable

from harli.daemon.supervisor import ChildEvent, ChildState, ProcHandle
from harli.ipc.control import MemoryStatus, SchedulerStatus
from harli.ipc.decode import BlocksLent, BlocksReturned, IterationTelemetry, RuntimeInfo
from harli.ipc.finetune import LeaseReturned, MicroStepReport


class NullChild:
    """A child that is configured off: it never starts, so it never runs, exits, reports or
    takes a signal. Listed nowhere (``harli status``, metrics): only real children are."""

    state = ChildState.STOPPED
    proc: ProcHandle | None = None
    incarnation = 0

    def __init__(self, name: str) -> None:
        self.name = name

    def start(self, now: float) -> None:
        pass

    def on_ready(self, incarnation: int, now: float) -> bool:
        return False

    def stop(self, request_stop: Callable[[], object] | None) -> int | None:
        return None

    def kill(self, reason: str) -> None:
        pass

    def restart(self, reason: str) -> None:
        pass

    def transition(self, now: float) -> list[ChildEvent]:
        return []


class NullScheduler:
    """No finetune, no quota: decode runs alone and nothing is decided or counted."""

    predicted_upper_s: float | None = None  # no decision, no prediction
    tpot_slo_s: float | None = None  # no SLO kept

    def set_policy(self, spec: str, now: float, tpot_slo_ms: float | None = None) -> None:
        raise ValueError("no finetune process (finetune.enabled = false): no quota to set")

    def on_telemetry(self, t: IterationTelemetry, now: float) -> None:
        pass

    def on_idle(self, now: float) -> None:
        pass

    def on_arrival(self, prompt_tokens: int, now: float, lora: bool = False) -> None:
        pass

    def on_tokens(self, gaps_s: list[float]) -> None:
        pass

    def on_request_done(self, first_s: float, last_s: float, n_tokens: int) -> None:
        pass

    def on_micro_step(self, r: MicroStepReport, now: float) -> None:
        pass

    def on_step_gap(self, now: float, same_job: bool = True) -> None:
        pass

    def status(self) -> SchedulerStatus | None:
        return None


class NullMemory:
    """No arena: nothing to lend or reclaim, and a decode restart never waits for pages."""

    def may_start_decode(self) -> bool:
        return True

    def on_decode_ready(self, incarnation: int, info: RuntimeInfo, now: float) -> None:
        pass

    def on_decode_exit(self, now: float) -> None:
        pass

    def on_telemetry(self, t: IterationTelemetry) -> None:
        pass

    def on_blocks_lent(self, msg: BlocksLent, now: float) -> None:
        pass

    def on_blocks_returned(self, msg: BlocksReturned) -> None:
        pass

    def set_finetune_training(self, training: bool, now: float) -> None:
        pass

    def on_micro_step(self, r: MicroStepReport) -> None:
        pass

    def on_lease_returned(self, msg: LeaseReturned, now: float) -> None:
        pass

    def on_finetune_exit(self, now: float) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def status(self) -> MemoryStatus | None:
        return None
