"""Saved activations in leased arena pages: same gradients, honest byte counts, no leftovers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from harli.arena.shm import ShmArena
from harli.datasets import IGNORE_INDEX
from harli.finetune_proc.activations import ActivationLease, combine_stats
from harli.finetune_proc.recipe import chunk_plan, chunk_weights, shifted_label_counts

MiB = 1 << 20
BIG_PAGE = 2 * MiB
SMALL_PAGE = 4096  # mmap.PAGESIZE, the smallest page an arena takes


@pytest.fixture
def make_arena() -> Iterator[Callable[[int, int], ShmArena]]:
    made: list[ShmArena] = []

    def make(size_bytes: int, page_bytes: int) -> ShmArena:
        a = ShmArena.create(f"harli-acttest-{uuid.uuid4().hex[:8]}", size_bytes, page_bytes)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()  # the creator's close unlinks the /dev/shm file


@pytest.fixture
def big_lease(make_arena: Callable[[int, int], ShmArena]) -> ActivationLease:
    arena = make_arena(64 * MiB, BIG_PAGE)
    lease = ActivationLease(arena, BIG_PAGE)
    lease.grant(list(range(arena.handle.num_pages)))
    return lease


@pytest.fixture(scope="module")
def model() -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64)
    # Random LoRA B (not PEFT's zeros), so the A gradients are not all zero.
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    m = get_peft_model(LlamaForCausalLM(cfg), lora)
    m.train()
    return m


def make_batch(lengths: list[int], width: int = 24, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded causal-LM batch; the first 4 tokens of each example are prompt (no loss)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 128, (n,), generator=g)
        labels[i, 4:n] = ids[i, 4:n]
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def skip_of(m: Any) -> list[torch.Tensor]:
    return [*m.parameters(), *m.buffers()]


def lora_grads(m: Any, batch: dict[str, torch.Tensor],
               lease: ActivationLease | None = None) -> dict[str, torch.Tensor]:
    m.zero_grad(set_to_none=True)
    if lease is None:
        m(**batch).loss.backward()
    else:
        with lease.micro_step(skip_of(m)):
            m(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n


def in_arena(t: torch.Tensor, arena: ShmArena) -> bool:
    base = arena.tensor(0, 64).data_ptr()
    return base <= t.data_ptr() < base + arena.handle.size_bytes


# -- the model: gradients and where the activations went --------------------------------------


def test_large_lease_same_grads_and_activations_in_lease(model: Any,
                                                         big_lease: ActivationLease) -> None:
    batch = make_batch([24, 17, 9])
    want = lora_grads(model, batch)
    got = lora_grads(model, batch, big_lease)
    assert_same_grads(want, got)
    st = big_lease.last_stats
    assert st.lease_bytes == 64 * MiB
    assert st.skipped_bytes > 0  # the frozen weights autograd saves are not activations
    assert st.lease_saved_bytes >= 0.9 * st.saved_bytes
    assert st.fallback_tensors == 0
    assert st.lease_saved_bytes <= st.peak_used_bytes <= st.lease_bytes
    assert big_lease.used_bytes == 0  # empty again at the micro-step end


def test_tiny_lease_falls_back_and_counts_and_grads_still_equal(
        model: Any, make_arena: Callable[[int, int], ShmArena]) -> None:
    arena = make_arena(16 * SMALL_PAGE, SMALL_PAGE)
    lease = ActivationLease(arena, SMALL_PAGE)
    lease.grant([3])
    batch = make_batch([24, 13])
    want = lora_grads(model, batch)
    got = lora_grads(model, batch, lease)
    assert_same_grads(want, got)
    st = lease.last_stats
    assert st.fallback_tensors > 0
    assert st.private_saved_bytes > 0
    assert 0 < st.lease_saved_bytes <= st.peak_used_bytes <= SMALL_PAGE
    assert lease.used_bytes == 0


def test_without_arena_nothing_is_copied_but_everything_is_counted(model: Any) -> None:
    lease = ActivationLease(None, BIG_PAGE)
    batch = make_batch([24, 10])
    want = lora_grads(model, batch)
    assert_same_grads(want, lora_grads(model, batch, lease))
    st = lease.last_stats
    assert st.lease_bytes == st.lease_saved_bytes == st.peak_used_bytes == 0
    assert st.private_saved_bytes > 0 and st.skipped_bytes > 0
    h = torch.randn(64, 64, requires_grad=True) * 2
    with lease.micro_step():
        y = h.sin()
        assert y.grad_fn._saved_self.data_ptr() == h.data_ptr()  # the tensor itself


# -- packing ------------------------------------------------------------------------------------


def test_saved_tensor_is_copied_into_the_lease(big_lease: ActivationLease) -> None:
    arena = big_lease._arena
    assert isinstance(arena, ShmArena)
    h = torch.randn(32, 48, requires_grad=True) * 2
    with big_lease.micro_step():
        y = h.t().sin()  # a non-contiguous saved tensor: stored contiguous
        saved = y.grad_fn._saved_self
        assert in_arena(saved, arena)
        assert torch.equal(saved, h.t())
        y.sum().backward()
    assert big_lease.last_stats.lease_saved_bytes == h.numel() * 4


def test_a_tensor_saved_twice_is_copied_once(big_lease: ActivationLease) -> None:
    h = torch.randn(128, 64, requires_grad=True) * 2
    with big_lease.micro_step():
        a, b = h.sin(), h.cos()  # both save h
        assert a.grad_fn._saved_self.data_ptr() == b.grad_fn._saved_self.data_ptr()
        (a + b).sum().backward()
    st = big_lease.last_stats
    assert st.lease_saved_bytes == h.numel() * 4
    assert st.peak_used_bytes == h.numel() * 4


def test_an_in_place_change_is_not_deduplicated(big_lease: ActivationLease) -> None:
    h = torch.randn(64, 64) * 2
    with big_lease.micro_step():
        w = torch.randn(64, 64, requires_grad=True)
        a = w * h  # saves h
        h.add_(1)
        b = w * h  # saves the changed h: a second copy
        assert not torch.equal(a.grad_fn._saved_other, b.grad_fn._saved_other)
    assert big_lease.last_stats.lease_saved_bytes == 2 * h.numel() * 4


def test_parameters_are_skipped_not_copied(big_lease: ActivationLease) -> None:
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True) * 2
    with big_lease.micro_step(skip_of(lin)):
        lin(x).sum().backward()
    st = big_lease.last_stats
    assert st.skipped_bytes == 64 * 64 * 4  # the weight
    assert st.lease_saved_bytes == 8 * 64 * 4  # the input


def test_runs_of_pages_hold_tensors_larger_than_a_page(
        make_arena: Callable[[int, int], ShmArena]) -> None:
    arena = make_arena(8 * SMALL_PAGE, SMALL_PAGE)
    lease = ActivationLease(arena, SMALL_PAGE)
    lease.grant([5, 1, 2, 3])
    assert lease.pages == [1, 2, 3, 5]
    assert lease.lease_bytes == 4 * SMALL_PAGE
    big = torch.randn(2 * SMALL_PAGE // 4) * 2  # two pages of float32
    small = torch.randn(SMALL_PAGE // 8) * 2
    w = torch.randn((), requires_grad=True)
    with lease.micro_step():
        (w * big).sum().backward()
        (w * small).sum().backward()
        (w * torch.randn(SMALL_PAGE // 2)).sum().backward()  # too big for what is left
    st = lease.last_stats
    # Pages 1-3 are one run: the two-page tensor fits there, the small one after it, and
    # the last tensor (half a page over what is left) goes private.
    assert st.lease_saved_bytes == 2 * SMALL_PAGE + SMALL_PAGE // 2
    assert st.fallback_tensors == 1 and st.private_saved_bytes == 2 * SMALL_PAGE


# -- lifecycle ----------------------------------------------------------------------------------


def our_hooks_installed() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def test_no_hook_leaks_and_the_lease_is_reset_after_an_exception(
        big_lease: ActivationLease) -> None:
    h = torch.randn(256, 256, requires_grad=True) * 2

    def fail_mid_forward() -> None:
        with big_lease.micro_step():
            assert our_hooks_installed()
            h.sin()
            assert big_lease.used_bytes > 0
            raise KeyError("boom")

    with pytest.raises(KeyError):
        fail_mid_forward()
    assert not our_hooks_installed()
    assert big_lease.used_bytes == 0
    assert big_lease.last_stats.lease_saved_bytes == h.numel() * 4
    big_lease.take_back([0])  # allowed again
    before = big_lease.last_stats
    (h.sin()).sum().backward()  # outside: not packed, not counted
    assert big_lease.last_stats is before


def test_backward_after_the_micro_step_ended_is_refused(big_lease: ActivationLease) -> None:
    h = torch.randn(64, 64, requires_grad=True) * 2
    with big_lease.micro_step():
        y = h.sin().sum()
    with pytest.raises(RuntimeError, match="after its micro-step ended"):
        y.backward()


def test_stats_of_passes_combine(big_lease: ActivationLease) -> None:
    h = torch.randn(64, 64, requires_grad=True)
    passes = []
    for _ in range(3):
        with big_lease.micro_step():
            h.sin().sum().backward()
        passes.append(big_lease.last_stats)
    total = combine_stats(passes)
    assert total.lease_saved_bytes == 3 * h.numel() * 4
    assert total.lease_bytes == passes[0].lease_bytes  # the largest, not the sum
    assert total.peak_used_bytes == max(p.peak_used_bytes for p in passes)


def test_grant_and_take_back_errors(make_arena: Callable[[int, int], ShmArena]) -> None:
    arena = make_arena(8 * SMALL_PAGE, SMALL_PAGE)
    lease = ActivationLease(arena, SMALL_PAGE)
    lease.grant([2, 3])
    with pytest.raises(ValueError, match=r"\[4, 6\]"):
        lease.take_back([3, 4, 6])
    assert lease.pages == [2, 3]  # unchanged
    with pytest.raises(ValueError, match=r"\[3\]"):
        lease.grant([3, 4])
    with pytest.raises(ValueError, match=r"\[8\]"):
        lease.grant([8])
    with pytest.raises(ValueError, match=r"\[5\]"):
        lease.grant([5, 5])
    assert lease.pages == [2, 3]
    with lease.micro_step():
        with pytest.raises(RuntimeError, match="between micro-steps"):
            lease.grant([4])
        with pytest.raises(RuntimeError, match="between micro-steps"):
            lease.take_back([2])
        with pytest.raises(RuntimeError):
            lease.micro_step().__enter__()
    lease.take_back([3, 2])
    assert lease.pages == [] and lease.lease_bytes == 0
    with pytest.raises(ValueError, match="without an arena"):
        ActivationLease(None, SMALL_PAGE).grant([0])
    with pytest.raises(ValueError, match="differs"):
        ActivationLease(arena, 2 * SMALL_PAGE)


# -- chunking math (the recipe's path) --------------------------------------------------------


@pytest.mark.parametrize(("n", "padded", "lease", "bpt", "want"), [
    (8, 100, 0, 1000.0, 8),  # no lease: one chunk
    (8, 100, 1 << 20, None, 1),  # no estimate yet: one example per chunk
    (8, 100, 1000 * 100 * 3, 900.0, 3),  # floor(0.9 * 300_000 / 90_000)
    (8, 100, 1 << 40, 1.0, 8),  # never more than the micro-batch
    (8, 100, 10, 1000.0, 1),  # never fewer than one
])
def test_chunk_plan(n: int, padded: int, lease: int, bpt: float | None, want: int) -> None:
    assert chunk_plan(n, padded, lease, bpt) == want


def test_chunk_weights() -> None:
    assert chunk_weights([3, 1, 0]) == [0.75, 0.25, 0.0]
    assert chunk_weights([0, 0]) == [0.0, 0.0]


def test_weighted_chunks_give_the_micro_batch_gradient(model: Any,
                                                       big_lease: ActivationLease) -> None:
    """One example per chunk, each in its own lease micro-step, weighted by its shifted label
    tokens: the gradient and the loss are those of the whole micro-batch (HF's mean loss)."""
    batch = make_batch([24, 6, 15, 5], seed=3)  # the last one has a single shifted label
    model.zero_grad(set_to_none=True)
    whole = model(**batch).loss
    whole.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    counts = shifted_label_counts(batch["labels"])
    assert counts == [20, 2, 11, 1]
    model.zero_grad(set_to_none=True)
    loss = 0.0
    for i, w in enumerate(chunk_weights(counts)):
        with big_lease.micro_step(skip_of(model)):
            out = model(**{k: v[i:i + 1] for k, v in batch.items()})
            (out.loss * w).backward()
        loss += float(out.loss.detach()) * w
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert_same_grads(want, got)
    assert loss == pytest.approx(float(whole.detach()), rel=1e-6)


def test_take_back_zeroes_the_pages_a_micro_step_wrote_and_leaves_the_others(
        model: Any, make_arena: Callable[[int, int], ShmArena]) -> None:
    arena = make_arena(64 * SMALL_PAGE, SMALL_PAGE)
    whole = arena.tensor(0, arena.handle.size_bytes)
    whole.fill_(7)  # what decode's KV blocks held before the grant: kept where not written
    lease = ActivationLease(arena, SMALL_PAGE)
    lease.grant(list(range(64)))
    lora_grads(model, make_batch([12]), lease)
    written = [p for p in range(64)
               if bool((arena.tensor(p * SMALL_PAGE, SMALL_PAGE) != 7).any())]
    assert written and len(written) < 64  # a small batch fills only the first pages
    untouched = [p for p in range(64) if p not in written]
    half = written[: len(written) // 2 + 1] + untouched[:2]
    assert lease.take_back(half) == (len(written) // 2 + 1) * SMALL_PAGE
    for p in half:
        expect = 0 if p in written else 7
        assert bool((arena.tensor(p * SMALL_PAGE, SMALL_PAGE) == expect).all()), p
    rest = written[len(written) // 2 + 1:]
    assert lease.take_back(lease.pages) == len(rest) * SMALL_PAGE  # still held, still dirty
    lease.grant(written)
    assert lease.take_back(written) == 0  # zeroed once: clean since
    pages = whole.view(64, SMALL_PAGE)
    assert bool((pages[written] == 0).all()) and bool((pages[untouched] == 7).all())
