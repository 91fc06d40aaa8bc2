"""``LoRARecipe.micro_step`` in chunks (``finetune.chunk_tokens``), on the real tiny model and
PEFT: the gradient is the whole micro-batch's, the micro-step yields between chunks where the
finetune may pause, the caller's waiting there is left out of the micro-step's duration, and a
micro-step abandoned there leaves the trainer's position where it was."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from harli.datasets import SAMPLE_DATASET
from harli.finetune_proc.recipe import LoRARecipe
from harli.ipc.jobs import JobSpec

WIDTH = 256  # max_seq_len: long enough that every digits record keeps its response


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harli.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture
def recipes(tiny: Path, tmp_path: Path) -> Iterator[tuple[LoRARecipe, LoRARecipe]]:
    """Two identical recipes (same seed: same LoRA init, same data order); grad_accum 2, so
    one micro-step leaves its gradient in .grad."""
    made = []
    for name in ("a", "b"):
        spec = JobSpec(name=name, dataset=str(SAMPLE_DATASET), output_dir=str(tmp_path / name),
                       max_steps=4, micro_batch_size=4, grad_accum=2, max_seq_len=WIDTH)
        r = LoRARecipe(spec, str(tiny), "cpu")
        r.setup()
        made.append(r)
    try:
        yield made[0], made[1]
    finally:
        for r in made:
            r.cleanup()


def _grads(r: LoRARecipe) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in r.model.named_parameters() if p.grad is not None}


def test_chunks_give_the_micro_batch_gradient_and_yield_in_between(
        recipes: tuple[LoRARecipe, LoRARecipe]) -> None:
    whole, chunked = recipes
    waits: list[float] = []

    t0 = time.perf_counter()
    r_whole = whole.train_micro_step(chunk_tokens=0)
    t1 = time.perf_counter()
    step = chunked.micro_step(chunk_tokens=1)  # 1 example each
    for _ in step:
        time.sleep(0.05)  # as if paused by the daemon
        waits.append(0.05)
        step.waited_s += 0.05
    wall_s = time.perf_counter() - t1
    r_chunked = step.result
    assert r_chunked is not None
    assert r_whole.chunks == 1 and r_whole.waited_s == 0.0 and t1 - t0 >= r_whole.duration_s
    assert r_chunked.chunks >= 2 and len(waits) >= r_chunked.chunks - 1
    assert r_chunked.waited_s == pytest.approx(sum(waits))
    assert r_chunked.duration_s == pytest.approx(wall_s - r_chunked.waited_s, abs=0.02)
    assert r_chunked.loss == pytest.approx(r_whole.loss, rel=1e-5)
    assert r_chunked.step_tokens == r_whole.step_tokens
    a, b = _grads(whole), _grads(chunked)
    assert a and a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6)


def test_a_micro_step_abandoned_between_chunks_leaves_the_trainer_where_it_was(
        recipes: tuple[LoRARecipe, LoRARecipe]) -> None:
    r, _ = recipes
    before = (r.state.micro_step, r.state.tokens)
    step = r.micro_step(chunk_tokens=1)
    for _ in step:
        break  # the job is cancelled while paused at the first boundary
    step.close()
    assert step.result is None
    assert (r.state.micro_step, r.state.tokens) == before
    assert _grads(r)  # the first chunk's gradient: incomplete, the caller discards it
    r.discard_partial_accumulation()
    assert not _grads(r)
    again = r.train_micro_step(chunk_tokens=1)  # and it trains on from there
    assert again.micro_step == before[0] + 1


def test_calls_between_blocks_come_in_forward_and_backward_and_leave_the_gradient_as_is(
        recipes: tuple[LoRARecipe, LoRARecipe]) -> None:
    from harli.finetune_proc.block_hooks import call_between_blocks

    plain, hooked = recipes
    layers = plain.model.config.num_hidden_layers
    calls: list[bool] = []  # grad mode at each call: on in forward, off in backward
    handles = call_between_blocks(hooked.model, lambda: calls.append(torch.is_grad_enabled()))
    r_plain = plain.train_micro_step(chunk_tokens=0)
    r_hooked = hooked.train_micro_step(chunk_tokens=0)
    # Each block and each of its submodules: at least one call per block in each direction.
    assert calls.count(True) >= 2 * layers and calls.count(False) >= 2 * layers
    # Backward's calls come after forward's, one block at a time.
    assert calls.index(False) > len(calls) - calls[::-1].index(True) - 1
    assert r_hooked.loss == pytest.approx(r_plain.loss, rel=1e-6)
    a, b = _grads(plain), _grads(hooked)
    assert a and a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=0)
    for h in handles:
        h.remove()
    calls.clear()
    hooked.train_micro_step(chunk_tokens=0)
    assert not calls


def test_a_chunk_size_set_between_chunks_follows_a_level_changed_in_between(
        recipes: tuple[LoRARecipe, LoRARecipe]) -> None:
    whole, chunked = recipes
    sizes = [WIDTH]  # one example, then three (a rise read in between)

    r_whole = whole.train_micro_step(chunk_tokens=0)
    step = chunked.micro_step(chunk_tokens=sizes[0])
    for _ in step:
        sizes.append(3 * WIDTH)
        step.chunk_tokens = sizes[-1]
    r = step.result
    n = chunked.spec.micro_batch_size  # 4 examples: 1 + 3
    assert r is not None and r.chunks == 2 and sizes == [WIDTH, 3 * WIDTH] and n == 4
    assert r.loss == pytest.approx(r_whole.loss, rel=1e-5)
    a, b = _grads(whole), _grads(chunked)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
