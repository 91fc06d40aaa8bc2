"""``FinetuneProc._at_chunk_boundary`` and ``_between_blocks``: where a micro-step in flight
obeys the daemon (and a checkpoint's scoring on the validation file, between two batches), and
the ``Inbox`` they read. Real ZMQ sockets stand in for the daemon's ends;
the finetune's own object is the real one."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from harli.config import load
from harli.finetune_proc.proc import FinetuneProc
from harli.finetune_proc.quota import CpuQuota
from harli.ipc.codec import Decoder, encode
from harli.ipc.finetune import (
    CheckpointSaved,
    Decision,
    FinetuneShutdown,
    FinetuneToDaemon,
    GrantLease,
    LeaseReturned,
    ReclaimLease,
    StartJob,
    StopJob,
    ValidationScore,
)
from harli.ipc.jobs import JobSpec


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[tuple[FinetuneProc, Any, Any]]:
    cfg = load(None, [f'daemon.runtime_dir="{tmp_path / "run"}"',
                      f'daemon.state_dir="{tmp_path / "state"}"'])
    cfg.runtime_dir.mkdir(parents=True)
    ctx = zmq.Context.instance()
    to_ft = ctx.socket(zmq.PUSH)
    to_ft.bind(cfg.internal_endpoint("finetune-in"))
    from_ft = ctx.socket(zmq.PULL)
    from_ft.bind(cfg.internal_endpoint("finetune-out"))
    proc = FinetuneProc(cfg, 1, CpuQuota(4, 2))
    try:
        yield proc, to_ft, from_ft
    finally:
        proc.close()
        to_ft.close(linger=0)
        from_ft.close(linger=0)


def _at_chunk_boundary(proc: FinetuneProc) -> float | None:
    """What the loop does with ``_at_chunk_boundary``: emit each message it yields at once,
    and take the value it returns (the seconds waited, or None: abandon the micro-step)."""
    boundary = proc._at_chunk_boundary()
    while True:
        try:
            msg = next(boundary)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]  # StopIteration.value is Any
        proc._emit(msg)


def _paused_at_chunk_boundary(proc: FinetuneProc) -> tuple[threading.Thread, dict[str, Any]]:
    """``_at_chunk_boundary`` run, in a thread, while the daemon has the finetune paused; it
    must be waiting there once the call is under way. ``out`` gets its value or its error."""
    proc.inbox.decision = Decision(level=0, admitted=False, seq=5)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = _at_chunk_boundary(proc)
        except BaseException as e:  # handed to the test
            out["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    time.sleep(0.3)
    assert th.is_alive()  # paused: the micro-step waits between its chunks
    return th, out


def test_running_it_returns_at_once(wired: tuple[FinetuneProc, Any, Any]) -> None:
    proc, to_ft, _ = wired
    proc.inbox.decision = Decision(level=2, admitted=True, seq=1)
    to_ft.send(encode(Decision(level=3, admitted=True, seq=2)))
    deadline = time.monotonic() + 10
    while proc.decision.seq != 2:  # drained by the call itself, never waiting
        assert _at_chunk_boundary(proc) == 0.0
        assert time.monotonic() < deadline
    assert proc.decision.level == 3


def test_paused_it_waits_answers_a_reclaim_and_resumes(
        wired: tuple[FinetuneProc, Any, Any]) -> None:
    proc, to_ft, from_ft = wired
    th, out = _paused_at_chunk_boundary(proc)
    # A reclaim while it waits is answered there, not at the micro-step's end (no arena in
    # this test: the finetune hands the pages back with that reason).
    to_ft.send(encode(ReclaimLease(seq=9, pages=[3, 4], deadline_s=time.monotonic() + 5)))
    assert from_ft.poll(5000)
    reply = Decoder(FinetuneToDaemon).decode(from_ft.recv())
    assert isinstance(reply, LeaseReturned) and reply.seq == 9 and reply.pages == [3, 4]
    assert th.is_alive()
    to_ft.send(encode(Decision(level=1, admitted=True, seq=6)))
    th.join(10)
    assert not th.is_alive() and "error" not in out
    assert out["value"] >= 0.3  # the seconds it waited, left out of the micro-step's time


def test_a_shutdown_while_paused_abandons_the_micro_step(
        wired: tuple[FinetuneProc, Any, Any]) -> None:
    proc, to_ft, _ = wired
    th, out = _paused_at_chunk_boundary(proc)
    to_ft.send(encode(FinetuneShutdown(reason="daemon stopping")))
    th.join(10)
    assert not th.is_alive() and "error" not in out
    assert out["value"] is None  # the micro-step is abandoned


def test_a_level_read_between_chunks_sets_the_threads_of_the_next_chunk(
        wired: tuple[FinetuneProc, Any, Any]) -> None:
    import torch

    proc, to_ft, _ = wired
    before = torch.get_num_threads()
    try:
        proc.inbox.decision = Decision(level=4, admitted=True, seq=1)
        proc._apply_decision()
        assert torch.get_num_threads() == 2  # level 4 of 2 threads
        to_ft.send(encode(Decision(level=2, admitted=True, seq=2)))  # decode got busy
        deadline = time.monotonic() + 10
        while proc.decision.seq != 2:
            _at_chunk_boundary(proc)
            assert time.monotonic() < deadline
        assert torch.get_num_threads() == 1 and proc._applied_seq == 2
    finally:
        torch.set_num_threads(before)


def test_between_blocks_a_new_level_applies_at_once_and_other_messages_wait_for_the_chunk(
        wired: tuple[FinetuneProc, Any, Any]) -> None:
    """Inside a chunk (``_between_blocks``, called from the model's block hooks) a rise is
    applied at once; a reclaim waits in the inbox for the chunk boundary, where the lease is
    empty, and is answered there before anything that came after it."""
    import torch

    proc, to_ft, from_ft = wired
    before = torch.get_num_threads()
    out: Decoder[FinetuneToDaemon] = Decoder(FinetuneToDaemon)
    try:
        proc.inbox.decision = Decision(level=2, admitted=True, seq=1)
        proc._apply_decision()
        assert torch.get_num_threads() == 1
        to_ft.send(encode(ReclaimLease(seq=7, pages=[3], deadline_s=time.monotonic() + 5)))
        to_ft.send(encode(Decision(level=4, admitted=True, seq=2)))  # decode went idle
        deadline = time.monotonic() + 10
        while proc.decision.seq != 2:
            proc._between_blocks()
            assert time.monotonic() < deadline
        assert torch.get_num_threads() == 2 and proc._applied_seq == 2  # mid-chunk
        assert len(proc.inbox) == 1 and not from_ft.poll(200)  # the reclaim waits
        to_ft.send(encode(Decision(level=0, admitted=True, seq=3)))  # a pause: waits too
        while proc.decision.seq != 3:
            proc._between_blocks()
            assert time.monotonic() < deadline
        assert torch.get_num_threads() == 2 and proc._applied_seq == 2
        # The chunk ends: the reclaim is answered (no arena here: its pages go straight
        # back), and the pause holds the micro-step between its chunks.
        to_ft.send(encode(Decision(level=2, admitted=True, seq=4)))
        while proc.decision.seq != 4:
            _at_chunk_boundary(proc)
            assert time.monotonic() < deadline
        assert not len(proc.inbox)
        reply = out.decode(from_ft.recv())
        assert isinstance(reply, LeaseReturned) and reply.seq == 7 and reply.pages == [3]
        assert torch.get_num_threads() == 1 and proc._applied_seq == 4
    finally:
        torch.set_num_threads(before)


def test_a_stop_while_running_lets_the_micro_step_finish(
        wired: tuple[FinetuneProc, Any, Any]) -> None:
    proc, to_ft, _ = wired
    proc.inbox.decision = Decision(level=2, admitted=True, seq=1)
    to_ft.send(encode(FinetuneShutdown(reason="daemon stopping")))
    deadline = time.monotonic() + 10
    while proc._stop_reason is None:
        assert _at_chunk_boundary(proc) == 0.0  # not abandoned: it was running
        assert time.monotonic() < deadline


def test_messages_read_between_blocks_are_handled_at_the_boundary_in_their_order(
        wired: tuple[FinetuneProc, Any, Any]) -> None:
    proc, to_ft, from_ft = wired
    proc.inbox.decision = Decision(level=2, admitted=True, seq=1)
    proc._apply_decision()
    to_ft.send(encode(ReclaimLease(seq=7, pages=[3], deadline_s=time.monotonic() + 5)))
    to_ft.send(encode(GrantLease(seq=8, pages=[4])))
    to_ft.send(encode(StopJob(job_id=1, reason="no such job: ignored")))
    deadline = time.monotonic() + 10
    while len(proc.inbox) < 3:
        proc._between_blocks()
        assert time.monotonic() < deadline
    assert not from_ft.poll(200)
    assert _at_chunk_boundary(proc) == 0.0 and not len(proc.inbox)
    out: Decoder[FinetuneToDaemon] = Decoder(FinetuneToDaemon)
    replies = [out.decode(from_ft.recv()) for _ in range(2)]
    # No arena here: the finetune hands every lease message's pages straight back.
    assert [(r.seq, r.pages) for r in replies if isinstance(r, LeaseReturned)] == [
        (7, [3]), (8, [4])]


def test_the_inbox_keeps_the_newest_decision_apart_and_the_rest_in_order(
        wired: tuple[FinetuneProc, Any, Any]) -> None:
    proc, to_ft, _ = wired
    inbox = proc.inbox
    to_ft.send(encode(Decision(level=3, admitted=True, seq=4)))
    to_ft.send(encode(ReclaimLease(seq=1, pages=[2], deadline_s=0.0)))
    to_ft.send(encode(Decision(level=1, admitted=True, seq=3)))  # overtaken: stale
    to_ft.send(encode(GrantLease(seq=2, pages=[5])))
    deadline = time.monotonic() + 10
    while len(inbox) < 2:
        inbox.drain(100)
        assert time.monotonic() < deadline
    assert inbox.decision == Decision(level=3, admitted=True, seq=4)
    assert [m.seq for m in inbox.take()] == [1, 2]  # type: ignore[union-attr]
    assert not len(inbox)
    to_ft.send(encode(StopJob(job_id=1, reason="x")))
    while not len(inbox):
        inbox.drain(100)
        assert time.monotonic() < deadline
    t0 = time.monotonic()
    inbox.drain(2000)  # something queued: no wait
    assert time.monotonic() - t0 < 0.5


# -- scoring a checkpoint on the validation file: obeys the daemon between two batches ---------


class _ScoringRecipe:
    """What ``FinetuneProc._checkpoint`` asks of a recipe: a scoring of three batches (the
    second fails if told to), then the checkpoint."""

    def __init__(self, fail: bool = False) -> None:
        from types import SimpleNamespace

        self.validates = True
        self.state = SimpleNamespace(step=4)
        self.epoch_progress = 0.5
        self.fail = fail
        self.batches = 0
        self.saved = 0

    def validate(self, chunk_tokens: int) -> Generator[None, None, ValidationScore]:
        for i in range(3):
            if i:
                yield
            if self.fail and i == 1:
                raise RuntimeError("out of memory")
            self.batches += 1
        return ValidationScore(loss=1.5, accuracy=0.25, examples=3, tokens=30, duration_s=0.1)

    def save_checkpoint(self) -> Path:
        self.saved += 1
        return Path("/o/checkpoint-4")


_JOB = StartJob(job_id=1, spec=JobSpec(name="j", dataset="/d.jsonl"), model_path="/m")


def _checkpoint(proc: FinetuneProc, recipe: _ScoringRecipe) -> list[FinetuneToDaemon]:
    """``_checkpoint`` as the loop runs it: what it yields is sent, and returned too."""
    sent = []
    for msg in proc._checkpoint(recipe, _JOB):  # type: ignore[arg-type]
        proc._emit(msg)
        sent.append(msg)
    return sent


def test_a_checkpoint_is_scored_then_written(wired: tuple[FinetuneProc, Any, Any]) -> None:
    proc, _, _ = wired
    proc.inbox.decision = Decision(level=2, admitted=True, seq=1)
    recipe = _ScoringRecipe()
    (saved,) = _checkpoint(proc, recipe)
    assert isinstance(saved, CheckpointSaved) and recipe.batches == 3 and recipe.saved == 1
    assert (saved.step, saved.path, saved.epoch) == (4, "/o/checkpoint-4", 0.5)
    assert saved.validation == ValidationScore(loss=1.5, accuracy=0.25, examples=3, tokens=30,
                                               duration_s=0.1)
    assert saved.validation_error is None


def test_a_stop_while_paused_in_a_scoring_gives_it_up_but_writes_the_checkpoint(
        wired: tuple[FinetuneProc, Any, Any]) -> None:
    proc, to_ft, _ = wired
    proc.job = _JOB
    proc.inbox.decision = Decision(level=0, admitted=False, seq=5)
    recipe = _ScoringRecipe()
    out: dict[str, Any] = {}
    th = threading.Thread(target=lambda: out.update(sent=_checkpoint(proc, recipe)),
                          daemon=True)
    th.start()
    time.sleep(0.3)
    assert th.is_alive() and recipe.batches == 1  # paused after the first batch
    to_ft.send(encode(StopJob(job_id=1, reason="cancelled")))
    th.join(10)
    assert not th.is_alive()
    (saved,) = out["sent"]
    assert isinstance(saved, CheckpointSaved) and recipe.saved == 1 and recipe.batches == 1
    assert saved.validation is None
    assert saved.validation_error == "given up: stopped while paused"
    assert proc._paused_s == 0.0  # abandoned there: its wait is not the next report's


def test_a_scoring_that_fails_fails_no_job(wired: tuple[FinetuneProc, Any, Any]) -> None:
    proc, _, _ = wired
    proc.inbox.decision = Decision(level=2, admitted=True, seq=1)
    recipe = _ScoringRecipe(fail=True)
    (saved,) = _checkpoint(proc, recipe)
    assert isinstance(saved, CheckpointSaved) and recipe.saved == 1
    assert saved.validation is None
    assert saved.validation_error == "validation failed: RuntimeError('out of memory')"
