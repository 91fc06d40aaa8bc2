"""What a job logs, on the real tiny model and PEFT: a logged step per ``log_every`` optimizer
steps (the last always), a validation score before each checkpoint, both in HF's log_history,
which a resumed job carries on; the scoring yields between batches and trains nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from harli.datasets import SAMPLE_DATASET
from harli.finetune_proc.recipe import LoRARecipe, MicroStepResult
from harli.finetune_proc.validation import batch_sizes
from harli.ipc.finetune import ValidationScore
from harli.ipc.jobs import JobSpec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harli.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture
def valid_file(tmp_path: Path) -> Path:
    # 10 held-out records of the sample task.
    lines = SAMPLE_DATASET.read_text().splitlines()[-10:]
    path = tmp_path / "valid.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _spec(tmp_path: Path, valid: Path, **kw: object) -> JobSpec:
    fields: dict[str, object] = {
        "name": "j", "dataset": str(SAMPLE_DATASET), "validation_file": str(valid),
        "output_dir": str(tmp_path / "out"), "max_steps": 4, "micro_batch_size": 4,
        "grad_accum": 2, "max_seq_len": 128, "checkpoint_every": 2, "lr_schedule": "linear"}
    fields.update(kw)
    return JobSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture
def make(tiny: Path) -> Iterator[type[LoRARecipe]]:
    made: list[LoRARecipe] = []

    class Recipe(LoRARecipe):
        def __init__(self, spec: JobSpec) -> None:
            super().__init__(spec, str(tiny), "cpu")
            self.setup()
            made.append(self)

    yield Recipe
    for r in made:
        r.cleanup()


def _validate(r: LoRARecipe, chunk_tokens: int = 0) -> tuple[ValidationScore, int]:
    run = r.validate(chunk_tokens)
    yields = 0
    while True:
        try:
            next(run)
        except StopIteration as done:
            return done.value, yields
        yields += 1
        assert not r.model.training  # eval mode (no dropout) while it scores


def _train_to_checkpoint(r: LoRARecipe) -> list[MicroStepResult]:
    results = []
    while True:
        results.append(r.train_micro_step())
        if r.checkpoint_due(results[-1]):
            return results


def test_logged_steps_scores_and_history_survive_a_resume(
        make: type[LoRARecipe], tmp_path: Path, valid_file: Path) -> None:
    from transformers import TrainerState as HFTrainerState

    r = make(_spec(tmp_path, valid_file))
    assert r.validates and len(r.validation_examples) == 10
    assert r.dataset_report()["validation_records"] == 10
    results = _train_to_checkpoint(r)
    assert [x.logged is not None for x in results] == [False, True, False, True]
    logs = [x.logged for x in results if x.logged is not None]
    assert [g.step for g in logs] == [1, 2]
    assert logs[0].epoch == pytest.approx(2 / r.micro_batches_per_epoch)
    assert logs[0].loss == pytest.approx((results[0].loss + results[1].loss) / 2)
    assert logs[0].learning_rate == pytest.approx(r.spec.learning_rate)  # linear: step 0's
    assert logs[1].learning_rate < logs[0].learning_rate
    assert logs[0].grad_norm is not None and logs[0].grad_norm > 0
    assert logs[1].tokens == results[3].tokens and logs[1].tokens_per_s > 0

    before = {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad}
    score, yields = _validate(r, chunk_tokens=1)  # one example a batch
    assert yields == 9 and r.model.training
    assert score.examples == 10 and score.tokens > 0 and 0 <= score.accuracy <= 1
    assert score.loss > 0 and score.duration_s > 0
    for n, p in r.model.named_parameters():  # scoring trains nothing
        if p.requires_grad:
            assert torch.equal(p, before[n]) and p.grad is None, n
    # The same score in bigger batches (padding changes nothing).
    whole, yields = _validate(r)
    assert yields == 2 and whole.loss == pytest.approx(score.loss, rel=1e-4)
    assert whole.accuracy == pytest.approx(score.accuracy)
    r.state.log_history.pop()  # keep one eval entry for step 2

    path = r.save_checkpoint()
    hf = HFTrainerState.load_from_json(str(path / "trainer_state.json"))
    assert hf.global_step == 2 and hf.max_steps == 4 and hf.logging_steps == 1
    assert hf.eval_steps == 2 and hf.train_batch_size == 4
    assert [sorted(e) for e in hf.log_history] == [
        ["epoch", "grad_norm", "learning_rate", "loss", "num_input_tokens_seen", "step"]] * 2 + [
        ["epoch", "eval_accuracy", "eval_loss", "eval_runtime", "eval_samples_per_second",
         "step"]]
    assert hf.log_history[-1]["eval_loss"] == pytest.approx(score.loss)
    assert hf.best_metric == pytest.approx(score.loss) and hf.best_global_step == 2
    assert hf.best_model_checkpoint == str(path)

    # A new process resumes from checkpoint-2 with the history, and adds to it.
    again = make(_spec(tmp_path, valid_file))
    assert again.resumed_from == 2 and again.state.log_history == hf.log_history
    more = _train_to_checkpoint(again)
    assert [x.logged.step for x in more if x.logged is not None] == [3, 4]
    _validate(again)
    final = json.loads((again.save_checkpoint() / "trainer_state.json").read_text())
    assert final["global_step"] == 4 and again.done
    assert [(e["step"], "eval_loss" in e) for e in final["log_history"]] == [
        (1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]


def test_log_every_thins_the_logged_steps_but_logs_the_last(
        make: type[LoRARecipe], tmp_path: Path, valid_file: Path) -> None:
    r = make(_spec(tmp_path, valid_file, validation_file="", max_steps=5, grad_accum=1,
                   log_every=2, checkpoint_every=100))
    assert not r.validates
    steps = [x.logged.step for x in (r.train_micro_step() for _ in range(5))
             if x.logged is not None]
    assert steps == [2, 4, 5]
    assert [e["step"] for e in r.state.log_history] == [2, 4, 5]


@pytest.mark.parametrize(("lengths", "max_examples", "chunk_tokens", "sizes"), [
    ([5, 5, 5, 5, 5], 2, 0, [2, 2, 1]),  # micro_batch_size caps a batch
    ([5, 5, 5, 5, 5], 8, 10, [2, 2, 1]),  # ... and so do the padded tokens
    ([3, 9, 3, 3], 8, 12, [1, 1, 2]),  # a long one would pad its neighbours past the cap
    ([20, 3], 8, 10, [1, 1]),  # an example over the cap still gets a batch of its own
    ([], 8, 0, []),
])
def test_batch_sizes(lengths: list[int], max_examples: int, chunk_tokens: int,
                     sizes: list[int]) -> None:
    from harli.datasets import Example

    examples = [Example([1] * n, [1] * n) for n in lengths]
    assert batch_sizes(examples, max_examples, chunk_tokens) == sizes
