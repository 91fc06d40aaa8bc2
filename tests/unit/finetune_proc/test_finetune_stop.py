"""``FinetuneProc._stop``: a cancel ends the job at once; a pause (``StopJob.keep_progress``)
writes a checkpoint of the last optimizer step unless one exists, then ends ``stopped``;
partway through a gradient accumulation it finishes the step while it may train, and drops
it (resuming from the last checkpoint) while the quota gives it nothing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from harli.finetune_proc.proc import FinetuneProc
from harli.ipc.finetune import (
    STOPPED,
    CheckpointSaved,
    Decision,
    FinetuneToDaemon,
    JobEnded,
    StartJob,
    StopJob,
)
from harli.ipc.jobs import JobSpec

from .test_finetune_pause import wired  # noqa: F401 - the fixture

_JOB = StartJob(job_id=1, spec=JobSpec(name="j", dataset="/d.jsonl"), model_path="/m")


class _Recipe:
    """What ``_stop`` asks of a recipe."""

    base_source = "disk"

    def __init__(self, step: int, micro_step: int, grad_accum: int = 1,
                 checkpointed: tuple[int, ...] = ()) -> None:
        self.state = SimpleNamespace(step=step, micro_step=micro_step)
        self.grad_accum = grad_accum
        self.checkpointed = set(checkpointed)
        self.epoch_progress = 0.5
        self.discarded = 0

    @property
    def at_step_boundary(self) -> bool:
        return bool(self.state.micro_step % self.grad_accum == 0)

    def has_checkpoint(self, step: int) -> bool:
        return step in self.checkpointed

    def save_checkpoint(self) -> Path:
        self.checkpointed.add(self.state.step)
        return Path(f"/o/checkpoint-{self.state.step}")

    def discard_partial_accumulation(self) -> None:
        self.discarded += 1

    def cleanup(self) -> None:
        pass


def _stopped(proc: FinetuneProc, recipe: _Recipe, *stops: StopJob) -> list[FinetuneToDaemon]:
    proc.job, proc.recipe = _JOB, recipe  # type: ignore[assignment]
    for stop in stops:
        proc._on_stop_job(stop)
    return list(proc._stop(recipe, _JOB))  # type: ignore[arg-type]


PAUSE = StopJob(job_id=1, reason="paused", keep_progress=True)
CANCEL = StopJob(job_id=1, reason="cancelled")


def test_a_pause_writes_a_checkpoint_of_its_last_step_then_ends_stopped(
        wired: tuple[FinetuneProc, Any, Any]) -> None:  # noqa: F811
    proc = wired[0]
    recipe = _Recipe(step=5, micro_step=5)
    saved, ended = _stopped(proc, recipe, PAUSE)
    assert isinstance(saved, CheckpointSaved) and (saved.step, saved.path) == (
        5, "/o/checkpoint-5")
    assert ended == JobEnded(job_id=1, status=STOPPED, error=None, adapter_path=None)
    assert proc.job is None and proc.recipe is None


def test_a_pause_right_after_a_checkpoint_or_before_any_step_writes_none(
        wired: tuple[FinetuneProc, Any, Any]) -> None:  # noqa: F811
    proc = wired[0]
    for recipe in (_Recipe(step=6, micro_step=6, checkpointed=(6,)),
                   _Recipe(step=0, micro_step=0)):
        (ended,) = _stopped(proc, recipe, PAUSE)
        assert isinstance(ended, JobEnded) and ended.status == STOPPED and ended.error is None


def test_a_pause_partway_through_an_accumulation_finishes_it_only_while_it_may_train(
        wired: tuple[FinetuneProc, Any, Any]) -> None:  # noqa: F811
    proc = wired[0]
    recipe = _Recipe(step=2, micro_step=5, grad_accum=2)
    proc.job, proc.recipe = _JOB, recipe  # type: ignore[assignment]
    proc._on_stop_job(PAUSE)
    proc.inbox.decision = Decision(level=2, admitted=True, seq=1)
    assert proc._finishes_accumulation(recipe)  # type: ignore[arg-type]
    proc.inbox.decision = Decision(level=0, admitted=False, seq=2)
    assert not proc._finishes_accumulation(recipe)  # type: ignore[arg-type]
    (ended,) = list(proc._stop(recipe, _JOB))  # type: ignore[arg-type]
    assert isinstance(ended, JobEnded) and ended.status == STOPPED
    assert ended.error is not None and "resumes from its last checkpoint" in ended.error
    assert recipe.discarded == 1


def test_a_cancel_outranks_a_pause_either_way_round(
        wired: tuple[FinetuneProc, Any, Any]) -> None:  # noqa: F811
    proc = wired[0]
    for stops in ((PAUSE, CANCEL), (CANCEL, PAUSE)):
        (ended,) = _stopped(proc, _Recipe(step=5, micro_step=5), *stops)
        assert isinstance(ended, JobEnded) and ended.status == "cancelled"
        proc._stop_job = None
