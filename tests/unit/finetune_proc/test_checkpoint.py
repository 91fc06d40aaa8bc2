"""Finetune checkpoints: exact resume, atomic replace, pruning, crash leftovers, final adapter."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from harli.finetune_proc import checkpoint as ckpt
from harli.finetune_proc.checkpoint import (
    RunPlan,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_final_adapter,
)

Setup = tuple[Any, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]
PLAN = RunPlan(max_steps=20, num_train_epochs=1, logging_steps=1, eval_steps=5, save_steps=5,
               train_batch_size=2, micro_batches_per_epoch=40)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harli.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("m") / "tiny", seed=0)


@pytest.fixture
def make_setup(tiny_path: Path) -> Callable[[int], Setup]:
    """Build base model + LoRA + AdamW + scheduler; ``seed`` sets the LoRA A init."""

    def make(seed: int) -> Setup:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_path)
        torch.manual_seed(seed)
        # Dropout > 0 so the losses depend on the torch RNG, which the checkpoint must restore.
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                         target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 20)
        return model, opt, sched

    return make


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(10, 500, (2, 16), generator=g) for _ in range(n)]


def _train_step(model: Any, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, batch: torch.Tensor) -> float:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.item())


def _adapter_weights(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _state(step: int, loss: float | None = None) -> TrainerState:
    return TrainerState(step=step, micro_step=step * 2, epoch=0, cursor=step * 2,
                        tokens=step * 64, loss=loss)


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders with a readable trainer state of harli's, by step: what a
    resume may start from."""
    found = []
    for p in output_dir.glob("checkpoint-*"):
        try:
            state = json.loads((p / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if ckpt.state_format(state) is not None:
            found.append(p)
    return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")))


def _draws() -> tuple[list[float], float, float]:
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def test_resume_continues_exactly(tmp_path: Path, make_setup: Callable[[int], Setup]) -> None:
    batches = _batches(5)
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    model, opt, sched = make_setup(0)
    for b in batches[:3]:
        _train_step(model, opt, sched, b)
    saved_state = _state(3, loss=1.25)
    path = save_checkpoint(tmp_path, model, opt, sched, saved_state, keep=3, plan=PLAN)
    assert path == tmp_path / "checkpoint-3"
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt",
                 "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (path / name).is_file(), name
    assert ckpt.state_format(json.loads((path / "trainer_state.json").read_text())) == 2
    torch_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()

    losses = [_train_step(model, opt, sched, b) for b in batches[3:]]
    weights = _adapter_weights(model)
    lr = sched.get_last_lr()
    draws = _draws()

    # A fresh process: different LoRA init, RNGs elsewhere.
    model2, opt2, sched2 = make_setup(99)
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)
    assert latest_checkpoint(tmp_path) == path
    state = load_checkpoint(path, model2, opt2, sched2)
    assert state == saved_state
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert random.getstate() == py_rng
    np_now = np.random.get_state()
    assert np_now[0] == np_rng[0] and np.array_equal(np_now[1], np_rng[1])
    assert np_now[2:] == np_rng[2:]
    assert sched2.last_epoch == 3

    losses2 = [_train_step(model2, opt2, sched2, b) for b in batches[3:]]
    assert losses2 == pytest.approx(losses, abs=1e-6, rel=0)
    weights2 = _adapter_weights(model2)
    assert weights2.keys() == weights.keys()
    for k, v in weights.items():
        torch.testing.assert_close(weights2[k], v, atol=1e-6, rtol=0)
    assert sched2.get_last_lr() == pytest.approx(lr)
    assert _draws() == draws


def test_keep_prunes_and_leftovers_are_ignored_then_removed(
    tmp_path: Path, make_setup: Callable[[int], Setup], caplog: pytest.LogCaptureFixture
) -> None:
    model, opt, sched = make_setup(0)
    save_checkpoint(tmp_path, model, opt, sched, _state(1), keep=2, plan=PLAN)
    save_checkpoint(tmp_path, model, opt, sched, _state(2), keep=2, plan=PLAN)
    assert _complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"]

    # Crash leftovers: a half-written tmp folder and a checkpoint folder without its marker.
    tmp_left = tmp_path / ".tmp-checkpoint-7-abc"
    tmp_left.mkdir()
    (tmp_left / "optimizer.pt").write_bytes(b"partial")
    incomplete = tmp_path / "checkpoint-50"
    incomplete.mkdir()
    (incomplete / "adapter_model.safetensors").write_bytes(b"junk")
    # A tmp folder that even has a valid marker, and a checkpoint with a bad marker.
    tmp_full = tmp_path / ".tmp-checkpoint-60-def"
    tmp_full.mkdir()
    (tmp_full / "trainer_state.json").write_text(
        json.dumps(_state(60).to_json(PLAN)))
    bad_marker = tmp_path / "checkpoint-70"
    bad_marker.mkdir()
    (bad_marker / "trainer_state.json").write_text('{"global_step": 1, "ste')
    other_format = tmp_path / "checkpoint-80"  # another trainer's: no state of harli's
    other_format.mkdir()
    (other_format / "trainer_state.json").write_text(
        json.dumps({"global_step": 80, "log_history": [], "stateful_callbacks": {}}))
    (tmp_path / "checkpoint-notanumber").mkdir()

    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert "checkpoint-50" in caplog.text and "incomplete" in caplog.text

    path3 = save_checkpoint(tmp_path, model, opt, sched, _state(3), keep=2, plan=PLAN)
    assert _complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", path3]
    assert latest_checkpoint(tmp_path) == path3
    assert not (tmp_path / "checkpoint-1").exists()
    for p in (tmp_left, tmp_full, incomplete, bad_marker, other_format):
        assert not p.exists(), p
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    save_checkpoint(tmp_path, model, opt, sched, _state(4), keep=1, plan=PLAN)
    assert _complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-4"]
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, model, opt, sched, _state(5), keep=0, plan=PLAN)
    assert _complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-4"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_saving_the_same_step_twice_replaces_it(
    tmp_path: Path, make_setup: Callable[[int], Setup], monkeypatch: pytest.MonkeyPatch,
    exchange: bool,
) -> None:
    if not exchange:
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    model, opt, sched = make_setup(0)
    first = save_checkpoint(tmp_path, model, opt, sched, _state(5, loss=1.0), keep=3, plan=PLAN)
    (first / "stale-marker").write_text("from the first save")
    _train_step(model, opt, sched, _batches(1)[0])
    weights = _adapter_weights(model)
    second = save_checkpoint(tmp_path, model, opt, sched, _state(5, loss=2.0), keep=3, plan=PLAN)
    assert second == first
    assert not (second / "stale-marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]

    model2, opt2, sched2 = make_setup(1)
    state = load_checkpoint(second, model2, opt2, sched2)
    assert state == _state(5, loss=2.0)
    for k, v in _adapter_weights(model2).items():
        torch.testing.assert_close(v, weights[k], atol=0, rtol=0)


def test_final_adapter_loads_with_peft(
    tmp_path: Path, tiny_path: Path, make_setup: Callable[[int], Setup]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, opt, sched = make_setup(0)
    out = tmp_path / "job"
    first = save_final_adapter(model, out)  # an older adapter that the second save replaces
    assert first == out / "adapter"
    for b in _batches(2):
        _train_step(model, opt, sched, b)
    path = save_final_adapter(model, out)
    assert path == first
    assert (path / "adapter_model.safetensors").is_file()
    assert (path / "adapter_config.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]

    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80]])
    model.eval()
    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_path)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        base_logits = fresh_base(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(fresh_base, path)
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert not torch.allclose(base_logits, want, atol=1e-4)  # training changed the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_latest_of_empty_or_missing_dir_is_none(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    assert _complete_checkpoints(tmp_path / "missing") == []
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint-3").mkdir()  # incomplete only
    assert latest_checkpoint(tmp_path) is None


def test_trainer_state_json_round_trip() -> None:
    s = TrainerState(step=3, micro_step=12, epoch=1, cursor=4, tokens=1000, loss=None)
    assert TrainerState.from_json(json.loads(json.dumps(s.to_json(PLAN)))) == s
    s2 = _state(9, loss=0.5)
    s2.log_history += [{"step": 9, "epoch": 0.45, "loss": 0.5, "learning_rate": 1e-3},
                       {"step": 9, "epoch": 0.45, "eval_loss": 0.7, "eval_accuracy": 0.4}]
    s2.best_metric, s2.best_global_step, s2.best_model_checkpoint = 0.7, 9, "/o/checkpoint-9"
    assert TrainerState.from_json(json.loads(json.dumps(s2.to_json(PLAN)))) == s2


def test_trainer_state_json_is_hf_trainer_state(
    tmp_path: Path, make_setup: Callable[[int], Setup]
) -> None:
    """What HF's own loader makes of a checkpoint's trainer_state.json: every field of its
    schema, harli's resume state among the callbacks' states."""
    import dataclasses

    from transformers import TrainerState as HFTrainerState

    model, opt, sched = make_setup(0)
    state = _state(10, loss=0.25)
    state.log_history += [{"step": 5, "epoch": 0.25, "loss": 0.5, "learning_rate": 1e-3,
                           "grad_norm": 0.1, "num_input_tokens_seen": 320},
                          {"step": 10, "epoch": 0.5, "loss": 0.25, "learning_rate": 5e-4,
                           "num_input_tokens_seen": 640},
                          {"step": 10, "epoch": 0.5, "eval_loss": 0.3, "eval_accuracy": 0.75}]
    state.best_metric, state.best_global_step = 0.3, 10
    state.best_model_checkpoint = str(tmp_path / "checkpoint-10")
    path = save_checkpoint(tmp_path, model, opt, sched, state, keep=1, plan=PLAN)
    text = (path / "trainer_state.json").read_text()
    assert set(json.loads(text)) == {f.name for f in dataclasses.fields(HFTrainerState)}

    hf = HFTrainerState.load_from_json(str(path / "trainer_state.json"))
    assert hf.global_step == 10 and hf.max_steps == 20 and hf.save_steps == 5
    assert hf.epoch == pytest.approx(20 / 40)  # micro-steps over micro-batches per epoch
    assert hf.num_input_tokens_seen == 640 and hf.train_batch_size == 2
    assert hf.log_history == state.log_history
    assert [e["loss"] for e in hf.log_history if "loss" in e] == [0.5, 0.25]
    assert hf.best_metric == 0.3 and hf.best_global_step == 10
    assert hf.best_model_checkpoint == str(path)
    assert hf.stateful_callbacks["HarliResumeState"]["attributes"]["micro_step"] == 20
    # HF's writer gives the same file back (its keys sorted, indent 2).
    hf.save_to_json(str(tmp_path / "again.json"))
    assert (tmp_path / "again.json").read_text() == text
    # ... and harli resumes from what HF wrote.
    again = tmp_path / "checkpoint-11"
    again.mkdir()
    for f in path.iterdir():
        (again / f.name).write_bytes(f.read_bytes())
    (again / "trainer_state.json").write_text((tmp_path / "again.json").read_text())
    model2, opt2, sched2 = make_setup(1)
    assert load_checkpoint(again, model2, opt2, sched2) == state


def test_a_checkpoint_of_the_older_flat_format_still_resumes(
    tmp_path: Path, make_setup: Callable[[int], Setup]
) -> None:
    model, opt, sched = make_setup(0)
    save_checkpoint(tmp_path, model, opt, sched, _state(4, loss=0.5), keep=1, plan=PLAN)
    old = tmp_path / "checkpoint-4"
    (old / "trainer_state.json").write_text(json.dumps(
        {"format": 1, "step": 4, "micro_step": 8, "epoch": 0, "cursor": 8, "tokens": 256,
         "loss": 0.5}, indent=2))
    assert latest_checkpoint(tmp_path) == old
    model2, opt2, sched2 = make_setup(1)
    state = load_checkpoint(old, model2, opt2, sched2)
    assert state == _state(4, loss=0.5) and state.log_history == []
    # Its next checkpoint is written in HF's schema.
    state.step = 5
    path = save_checkpoint(tmp_path, model2, opt2, sched2, state, keep=2, plan=PLAN)
    assert json.loads((path / "trainer_state.json").read_text())["global_step"] == 5
    assert latest_checkpoint(tmp_path) == path


def test_load_refuses_an_incomplete_checkpoint(
    tmp_path: Path, make_setup: Callable[[int], Setup]
) -> None:
    model, opt, sched = make_setup(0)
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoint-1", model, opt, sched)
