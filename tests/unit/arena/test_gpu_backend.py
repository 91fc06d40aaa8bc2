"""The GPU backend's pure pieces on CPU: IPC handle encoding, the CUDA arena's bookkeeping over a
fake runtime (host memory standing in for device memory), SM counts per level, the quota's mode
choice and stream switching with fakes, decode->finetune weight sharing (names, rows, binding on
harli's tiny model shape, export/import), and ``harli gpu-check`` without CUDA."""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harli.arena import cuda as cuda_arena
from harli.arena import weights as arena_weights
from harli.arena.cuda import (
    CudaArena,
    check_arena_size,
    check_cuda,
    check_view_range,
    decode_ipc_handle,
    encode_ipc_handle,
    handle_bytes,
    open_arena,
)
from harli.arena.shm import ArenaError, ShmArena
from harli.arena.weights import (
    WeightShareError,
    export_weights,
    import_weights,
    span_bytes,
    validate_export,
)
from harli.finetune_proc import gpu_quota
from harli.finetune_proc.gpu_quota import (
    GpuQuota,
    GreenSupport,
    SmPartition,
    choose_mode,
    documented_partition,
    mps_pct_from_env,
    probe_green_support,
    set_mps_percentage_env,
    sm_counts,
)
from harli.finetune_proc.shared_weights import (
    LlamaShape,
    WeightView,
    bind_shared_weights,
    build_shared_model,
    fused_from_hf,
    hf_name,
    hf_weight_views,
)
from harli.gpu_check import report as rep
from harli.ipc.arena import ArenaHandle
from harli.ipc.weights import WeightExport, WeightsExported
from harli.model.tiny import TinyModelSpec

MIB = 1 << 20

# ---------------------------------------------------------------------------------------------
# A fake CUDA runtime over host memory
# ---------------------------------------------------------------------------------------------


class FakeRuntime:
    """``CudaRuntime`` on host memory: a block is a torch uint8 tensor, its IPC handle carries
    its address, and "opening" it maps the same memory (as a real import shows the same bytes).
    Blocks are never really freed, so a test that gets lifetimes wrong fails, not crashes."""

    def __init__(self) -> None:
        self.blocks: dict[int, torch.Tensor] = {}
        self.freed: list[int] = []
        self.opened: list[int] = []
        self.closed: list[int] = []
        self.fail_malloc = False

    def current_device(self) -> int:
        return 0

    def malloc(self, nbytes: int, device: int) -> int:
        if self.fail_malloc:
            raise ArenaError(f"cudaMalloc({nbytes}) failed: cudaErrorMemoryAllocation (2)")
        t = torch.full((nbytes,), 0xAB, dtype=torch.uint8)  # garbage, as cudaMalloc gives
        self.blocks[t.data_ptr()] = t
        return int(t.data_ptr())

    def free(self, ptr: int) -> None:
        self.freed.append(ptr)

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        base, _ = self.address_range(ptr)
        self.blocks[base][ptr - base:ptr - base + nbytes].fill_(value)

    def ipc_get_handle(self, ptr: int) -> bytes:
        if ptr not in self.blocks:
            raise ArenaError("cudaIpcGetMemHandle failed: cudaErrorInvalidValue (1)")
        return b"HARLI" + ptr.to_bytes(8, "little") + bytes(51)

    def ipc_open_handle(self, raw: bytes, device: int) -> int:
        ptr = int.from_bytes(raw[5:13], "little")
        if ptr not in self.blocks:
            raise ArenaError("cudaIpcOpenMemHandle failed: cudaErrorInvalidResourceHandle (400)")
        self.opened.append(ptr)
        return ptr

    def ipc_close_handle(self, ptr: int) -> None:
        self.closed.append(ptr)

    def address_range(self, ptr: int) -> tuple[int, int]:
        for base, t in self.blocks.items():
            if base <= ptr < base + t.numel():
                return base, t.numel()
        raise ArenaError("cuMemGetAddressRange failed: CUDA_ERROR_NOT_FOUND (500)")

    def tensor(self, ptr: int, nbytes: int, owner: object, device: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        arr = (ctypes.c_uint8 * nbytes).from_address(ptr)
        arr._owner = owner  # type: ignore[attr-defined]  # as torch keeps the CAI holder
        return torch.frombuffer(arr, dtype=torch.uint8)


@pytest.fixture
def rt() -> FakeRuntime:
    return FakeRuntime()


def _as_other_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget what this process exported, so attach/import take the IPC path."""
    monkeypatch.setattr(cuda_arena, "_LOCAL_EXPORTS", cuda_arena.weakref.WeakValueDictionary())
    monkeypatch.setattr(arena_weights, "_EXPORTED_HERE", {})


# ---------------------------------------------------------------------------------------------
# IPC handles and checks
# ---------------------------------------------------------------------------------------------


def test_handle_round_trips_as_128_hex_characters() -> None:
    raw = bytes(range(64))
    text = encode_ipc_handle(raw)
    assert len(text) == 128 and decode_ipc_handle(text) == raw
    assert decode_ipc_handle(text.upper()) == raw


@pytest.mark.parametrize(("text", "problem"), [
    ("ab" * 63, "128 hex characters"),
    ("ab" * 65, "got 130 characters"),
    ("", "got 0 characters"),
    ("zz" + "ab" * 63, "must be hex; found 'z'"),
    ("ab" * 63 + "-+", "must be hex; found '+-'"),
])
def test_malformed_handles_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ArenaError, match=problem.replace("+", r"\+")):
        decode_ipc_handle(text)


def test_encoding_refuses_a_handle_of_the_wrong_length() -> None:
    with pytest.raises(ArenaError, match="64 bytes, got 63"):
        encode_ipc_handle(bytes(63))


def test_reserved_bytes_from_either_cuda_python_layout() -> None:
    assert handle_bytes(b"\x01\xff") == b"\x01\xff"
    assert handle_bytes([1, -1, 127, -128]) == b"\x01\xff\x7f\x80"  # signed chars


class _Err(int):
    @property
    def name(self) -> str:
        return {0: "cudaSuccess", 2: "cudaErrorMemoryAllocation"}.get(int(self), "")


def test_cuda_results_unpack_or_raise_with_the_error_name() -> None:
    assert check_cuda((_Err(0),), "cudaFree") is None
    assert check_cuda((_Err(0), 42), "cudaMalloc") == 42
    assert check_cuda((_Err(0), 1, 2), "cuMemGetAddressRange") == (1, 2)
    with pytest.raises(ArenaError,
                       match=r"cudaMalloc\(8\) failed: cudaErrorMemoryAllocation \(2\)"):
        check_cuda((_Err(2), 0), "cudaMalloc(8)")
    with pytest.raises(ValueError, match="CUDA error 999"):
        check_cuda((999,), "x", ValueError)


@pytest.mark.parametrize(("offset", "nbytes", "dtype"), [
    (0, 4096, torch.float32), (-4, 8, torch.uint8), (4092, 8, torch.uint8), (0, -1, torch.uint8),
    (2, 8, torch.float32), (0, 6, torch.float32), (8, 4088, torch.float64), (4088, 8, torch.int64),
])
def test_range_checks_match_the_shm_arena(tmp_path: Path, offset: int, nbytes: int,
                                          dtype: torch.dtype) -> None:
    shm = ShmArena.create("harli-test-gpu-parity", 4096, 4096, shm_dir=tmp_path)
    try:
        try:
            shm.tensor(offset, nbytes, dtype)
            shm_error = None
        except ArenaError as e:
            shm_error = str(e)
    finally:
        shm.close()
    try:
        check_view_range(4096, offset, nbytes, dtype.itemsize, str(dtype))
        cuda_error = None
    except ArenaError as e:
        cuda_error = str(e)
    assert cuda_error == shm_error


def test_arena_size_must_be_whole_2mib_allocations() -> None:
    check_arena_size(4 * MIB, 2 * MIB)
    with pytest.raises(ArenaError, match="multiple of 2 MiB"):
        check_arena_size(3 * 64 << 10, 64 << 10)
    with pytest.raises(ArenaError, match="multiple of the page size"):
        check_arena_size(5 * MIB, 2 * MIB)
    with pytest.raises(ArenaError, match="must be positive"):
        check_arena_size(2 * MIB, 0)


# ---------------------------------------------------------------------------------------------
# CudaArena over the fake runtime
# ---------------------------------------------------------------------------------------------


def test_create_zeroes_exports_and_serves_views(rt: FakeRuntime) -> None:
    arena = CudaArena.create(4 * MIB, 2 * MIB, generation=3, runtime=rt)
    h = arena.handle
    assert (h.kind, h.size_bytes, h.page_bytes, h.generation, h.num_pages) == (
        "cuda", 4 * MIB, 2 * MIB, 3, 2)
    assert decode_ipc_handle(h.name)[:5] == b"HARLI"
    assert int(arena.tensor(0, 4 * MIB).sum()) == 0  # cudaMalloc garbage was zeroed
    t = arena.tensor(2 * MIB, 64, torch.float32)
    t.fill_(1.5)
    assert t.dtype == torch.float32 and t.shape == (16,)
    assert t.data_ptr() == arena.base_address + 2 * MIB
    assert float(arena.tensor(2 * MIB, 4, torch.float32)[0]) == 1.5
    with pytest.raises(ArenaError, match="outside the arena"):
        arena.tensor(4 * MIB - 4, 8)
    with pytest.raises(ArenaError, match=r"not aligned to torch.float32"):
        arena.tensor(2, 8, torch.float32)
    assert arena.tensor(0, 0, torch.bfloat16).numel() == 0
    arena.close()


def test_attach_in_another_process_maps_the_same_memory(rt: FakeRuntime,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    owner = CudaArena.create(2 * MIB, 2 * MIB, runtime=rt)
    owner.tensor(0, 16, torch.int32).fill_(7)
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(owner.handle), type=ArenaHandle)
    _as_other_process(monkeypatch)
    peer = CudaArena.attach(wire, runtime=rt)
    assert rt.opened == [owner.base_address] and not peer.owner
    assert bool((peer.tensor(0, 16, torch.int32) == 7).all())
    peer.tensor(64, 8, torch.float64).fill_(2.0)
    assert float(owner.tensor(64, 8, torch.float64)[0]) == 2.0
    peer.close()
    gc.collect()
    assert rt.closed == [owner.base_address] and rt.freed == []  # unmapped, not freed
    owner.close()
    gc.collect()
    assert rt.freed == [owner.base_address]


def test_attach_in_the_exporting_process_reuses_its_mapping(rt: FakeRuntime) -> None:
    owner = CudaArena.create(2 * MIB, 2 * MIB, runtime=rt)
    same = CudaArena.attach(owner.handle, runtime=rt)
    assert same.base_address == owner.base_address and rt.opened == []
    owner.close()
    gc.collect()
    assert rt.freed == []  # the second arena still holds it
    same.close()
    gc.collect()
    assert rt.freed == [owner.base_address] and rt.closed == []


def test_memory_outlives_close_while_a_view_uses_it(rt: FakeRuntime) -> None:
    arena = CudaArena.create(2 * MIB, 2 * MIB, runtime=rt)
    base = arena.base_address
    view = arena.tensor(0, 1024, torch.float16)
    arena.close()
    gc.collect()
    assert rt.freed == []
    with pytest.raises(ArenaError, match="closed"):
        arena.tensor(0, 8)
    view.fill_(1.0)  # still valid memory
    del view
    gc.collect()
    assert rt.freed == [base]


def test_errors_say_what_to_change(rt: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    rt.fail_malloc = True
    with pytest.raises(ArenaError, match=r"cudaErrorMemoryAllocation.*lower memory.arena_gib"):
        CudaArena.create(2 * MIB, 2 * MIB, runtime=rt)
    handle = ArenaHandle(kind="cuda", name="00" * 64, size_bytes=2 * MIB, page_bytes=2 * MIB,
                         generation=1)
    _as_other_process(monkeypatch)
    with pytest.raises(ArenaError, match=r"cudaErrorInvalidResourceHandle.*creator still running"):
        CudaArena.attach(handle, runtime=rt)
    with pytest.raises(ArenaError, match="as a CUDA arena"):
        CudaArena.attach(ArenaHandle(kind="shm", name="/dev/shm/x", size_bytes=2 * MIB,
                                     page_bytes=2 * MIB, generation=1), runtime=rt)
    with pytest.raises(ArenaError, match="must be hex"):
        CudaArena.attach(ArenaHandle(kind="cuda", name="xy" * 64, size_bytes=2 * MIB,
                                     page_bytes=2 * MIB, generation=1), runtime=rt)


def test_open_arena_dispatches_on_kind(rt: FakeRuntime, tmp_path: Path) -> None:
    shm = ShmArena.create("harli-test-open-arena", 8192, 4096, shm_dir=tmp_path)
    try:
        assert isinstance(open_arena(shm.handle, prefault=False), ShmArena)
    finally:
        shm.close()
    cuda = CudaArena.create(2 * MIB, 2 * MIB, runtime=rt)
    assert isinstance(open_arena(cuda.handle, runtime=rt), CudaArena)
    with pytest.raises(ArenaError, match="unknown arena kind 'nvme'"):
        open_arena(ArenaHandle(kind="nvme", name="x", size_bytes=1, page_bytes=1, generation=1))


# ---------------------------------------------------------------------------------------------
# SM counts, partitions, mode choice
# ---------------------------------------------------------------------------------------------


def test_sm_counts_on_an_h100() -> None:
    assert sm_counts(4, 132, 8, 8) == {1: 32, 2: 64, 3: 96, 4: 132}
    assert sm_counts(1, 132, 8, 8) == {1: 132}
    assert sm_counts(8, 132, 8, 8) == {1: 16, 2: 32, 3: 48, 4: 64, 5: 80, 6: 96, 7: 112,
                                       8: 132}
    # More levels than partitions: low levels share the smallest one.
    assert sm_counts(32, 132, 8, 8)[1] == sm_counts(32, 132, 8, 8)[2] == 8


def test_sm_counts_small_devices_and_minimums() -> None:
    assert sm_counts(4, 6, 8, 8) == {1: 6, 2: 6, 3: 6, 4: 6}  # smaller than one partition
    assert sm_counts(4, 108, 2, 4) == {1: 26, 2: 54, 3: 80, 4: 108}  # A100 (CC 8.0)
    assert sm_counts(4, 132, 8, 5) == {1: 32, 2: 64, 3: 96, 4: 132}  # min rounds up to 8


@pytest.mark.parametrize("bad", [(0, 132, 8, 8), (4, 0, 8, 8), (4, 132, 0, 8), (4, 132, 8, 0)])
def test_sm_counts_rejects_nonpositive_inputs(bad: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        sm_counts(*bad)


@given(levels=st.integers(1, 64), total=st.integers(1, 300), gran=st.integers(1, 16),
       min_sms=st.integers(1, 40))
def test_sm_counts_properties(levels: int, total: int, gran: int, min_sms: int) -> None:
    counts = sm_counts(levels, total, gran, min_sms)
    smallest = -(-min_sms // gran) * gran
    assert sorted(counts) == list(range(1, levels + 1))
    assert counts[levels] == total  # the top level is the whole device
    values = [counts[lv] for lv in range(1, levels + 1)]
    assert values == sorted(values)  # monotone
    for level, n in counts.items():
        assert 1 <= n <= total
        if level < levels and n < total:
            assert n % gran == 0  # aligned partitions
            assert n >= smallest
            # never more than its share, unless the smallest partition is more
            assert n <= max(smallest, total * level / levels)


@pytest.mark.parametrize(("cc", "expected"), [
    ((6, 1), (1, 1)), ((7, 0), (2, 2)), ((8, 0), (4, 2)), ((8, 9), (4, 2)), ((9, 0), (8, 8)),
    ((10, 0), (8, 8)), ((12, 0), (8, 8)), ((5, 2), (1, 1)),
])
def test_documented_partition_sizes(cc: tuple[int, int], expected: tuple[int, int]) -> None:
    p = documented_partition(*cc, total_sms=100)
    assert (p.min_sms, p.granularity, p.source) == (*expected, "documented")


def _support(backend: str | None = "torch", pct: int | None = None) -> GreenSupport:
    return GreenSupport(backend, "" if backend else "no green contexts here", pct)


@pytest.mark.parametrize(("requested", "support", "mode", "why"), [
    ("green_context", _support(), "green_context", "via torch"),
    ("green_context", _support("cuda-python"), "green_context", "via cuda-python"),
    ("green_context", _support(None), "mps_percentage", "unavailable: no green contexts"),
    ("green_context", _support(pct=50), "mps_percentage", "PERCENTAGE=50 is set"),
    ("green_context", _support(pct=100), "green_context", "via torch"),
    ("mps_percentage", _support(), "mps_percentage", "gpu.quota = mps_percentage"),
])
def test_mode_choice(requested: str, support: GreenSupport, mode: str, why: str) -> None:
    got, reason = choose_mode(requested, support)
    assert got == mode and why in reason


def test_mode_choice_rejects_unknown_quota() -> None:
    with pytest.raises(ValueError, match=r"gpu.quota"):
        choose_mode("libsmctrl", _support())


def _fake_torch(available: bool = True, green: bool = False) -> Any:
    cuda = SimpleNamespace(is_available=lambda: available, is_initialized=lambda: False,
                           green_contexts=SimpleNamespace(SUPPORTED=green))
    return SimpleNamespace(cuda=cuda)


class _FakeDriver:
    def __init__(self, version: int, green: bool = True) -> None:
        self.version = version
        if green:
            self.cuGreenCtxCreate = object()

    def cuDriverGetVersion(self) -> tuple[int, int]:
        return 0, self.version


def test_probe_prefers_torch_then_cuda_python() -> None:
    env = {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "40"}
    assert probe_green_support(_fake_torch(available=False), env).reason == (
        "CUDA is not available")
    s = probe_green_support(_fake_torch(green=True), env)
    assert (s.backend, s.mps_active_thread_pct) == ("torch", 40)
    s = probe_green_support(_fake_torch(), {}, lambda: _FakeDriver(13000))
    assert s.backend == "cuda-python" and s.mps_active_thread_pct is None
    older = _fake_torch()  # a torch whose green_contexts module has no SUPPORTED flag
    older.cuda.green_contexts = SimpleNamespace()
    older._C = SimpleNamespace(_CUDAGreenContext=object)
    assert probe_green_support(older, {}).backend == "torch"


def test_probe_says_why_green_contexts_are_missing() -> None:
    def no_cuda_python() -> Any:
        raise ImportError("no cuda")

    s = probe_green_support(_fake_torch(), {}, no_cuda_python)
    assert s.backend is None and "pip install 'harli[gpu]'" in s.reason
    s = probe_green_support(_fake_torch(), {}, lambda: _FakeDriver(12020))
    assert s.backend is None and "CUDA 12.2; green contexts need 12.4" in s.reason
    s = probe_green_support(_fake_torch(), {}, lambda: _FakeDriver(12080, green=False))
    assert s.backend is None and "no cuGreenCtxCreate" in s.reason


def test_mps_percentage_from_env() -> None:
    assert mps_pct_from_env({}) is None
    assert mps_pct_from_env({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": " 25 "}) == 25
    assert mps_pct_from_env({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "half"}) is None


def test_fallback_percentage_is_set_only_before_cuda_starts() -> None:
    env: dict[str, str] = {}
    assert set_mps_percentage_env(30, _fake_torch(), env) == 30
    assert env == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}
    assert set_mps_percentage_env(60, _fake_torch(), env) == 30  # the supervisor's wins
    late = _fake_torch()
    late.cuda.is_initialized = lambda: True
    env = {}
    assert set_mps_percentage_env(30, late, env) is None and env == {}
    with pytest.raises(ValueError, match=r"1..100"):
        set_mps_percentage_env(0, _fake_torch(), {})


# ---------------------------------------------------------------------------------------------
# GpuQuota with a fake backend
# ---------------------------------------------------------------------------------------------


class _Target:
    def __init__(self, log: list[str], name: str, sms: int) -> None:
        self.log, self.name, self.sms = log, name, sms

    def enter(self) -> None:
        self.log.append(f"enter {self.name}")

    def leave(self) -> None:
        self.log.append(f"leave {self.name}")


class _Backend:
    name = "fake"

    def __init__(self, log: list[str], fail: bool = False) -> None:
        self.log, self.fail, self.created = log, fail, []

    def full_device(self) -> _Target:
        return _Target(self.log, "full", 132)

    def partition(self, num_sms: int) -> _Target:
        if self.fail:
            raise RuntimeError("cuGreenCtxCreate failed: CUDA_ERROR_NOT_SUPPORTED (801)")
        self.created.append(num_sms)
        return _Target(self.log, f"g{num_sms}", num_sms)


H100 = SmPartition(total_sms=132, min_sms=8, granularity=8, source="driver")


def test_green_quota_switches_streams_only_on_a_level_change() -> None:
    log: list[str] = []
    backend = _Backend(log)
    q = GpuQuota(4, backend_factory=lambda name, dev, total: backend)
    q.start(_support(), H100)
    assert q.mode == "green_context" and q.sm_counts == {1: 32, 2: 64, 3: 96, 4: 132}
    assert backend.created == [32, 64, 96]  # the top level is the plain device
    q.apply(2)
    q.apply(2)
    q.apply(4)
    q.apply(1)
    q.close()
    assert log == ["enter g64", "leave g64", "enter full", "leave full", "enter g32",
                   "leave g32", "enter full"]  # close: back on the whole device
    assert q.idle_after(1, 0.5) == 0.0  # the partition is the quota, not a duty cycle
    with pytest.raises(ValueError, match=r"outside 1..4"):
        q.apply(0)
    d = q.describe()
    assert d["mode"] == "green_context" and d["sm_counts"][1] == 32
    assert d["partition_source"] == "driver"


def test_levels_with_equal_sm_counts_share_one_context() -> None:
    log: list[str] = []
    backend = _Backend(log)
    q = GpuQuota(32, backend_factory=lambda name, dev, total: backend)
    q.start(_support(), H100)
    assert len(backend.created) == len(set(backend.created)) == 15  # 8, 16, ..., 120
    q.apply(1)
    q.apply(2)  # same 8 SMs: no switch
    assert log == ["enter g8"]


def test_failed_context_creation_falls_back_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    q = GpuQuota(4, backend_factory=lambda name, dev, total: _Backend([], fail=True))
    q.start(_support(pct=None), H100)
    assert q.mode == "mps_percentage"
    assert "creating green contexts failed" in q.reason and "NOT_SUPPORTED" in q.reason
    assert "duty cycle only" in caplog.text
    q.apply(3)  # nothing to switch
    assert q.idle_after(1, 1.0) == pytest.approx(3.0)  # 25% duty
    assert q.idle_after(4, 1.0) == 0.0
    assert q.describe()["mode"] == "mps_percentage"


def test_mps_percentage_mode_reports_the_percentage() -> None:
    q = GpuQuota(4, requested="mps_percentage", fallback_pct=40)
    q.start(_support(pct=40), None)
    d = q.describe()
    assert (d["mode"], d["active_thread_pct"], d["fallback_pct"]) == ("mps_percentage", 40, 40)
    with pytest.raises(ValueError, match=r"gpu.quota"):
        GpuQuota(4, requested="time_slice")


def test_make_quota_keeps_the_cpu_quota_on_cpu() -> None:
    from harli.config import HarliConfig

    sentinel = SimpleNamespace(levels=4)
    assert gpu_quota.make_quota(HarliConfig(), "cpu", lambda: sentinel) is sentinel  # type: ignore[arg-type,return-value]


# ---------------------------------------------------------------------------------------------
# Shared weights: names and rows
# ---------------------------------------------------------------------------------------------


def _tiny_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    spec = TinyModelSpec()
    fields = {"vocab_size": spec.vocab_size - 12, "hidden_size": spec.hidden_size,
              "intermediate_size": spec.intermediate_size,
              "num_hidden_layers": spec.num_hidden_layers,
              "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": 2,
              "tie_word_embeddings": False}
    fields.update(overrides)
    return LlamaConfig(**fields)


def _tiny_model(**overrides: Any) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_tiny_config(**overrides)).eval()


def test_views_undo_vllms_stacking() -> None:
    shape = LlamaShape(num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       intermediate_size=688, vocab_size=500)
    views = hf_weight_views(shape, {
        "model.layers.0.self_attn.qkv_proj.weight": (512, 256),
        "model.layers.0.mlp.gate_up_proj.weight": (1376, 256),
        "model.embed_tokens.weight": (512, 256), "lm_head.weight": (512, 256),
        "model.norm.weight": (256,)})
    qkv, gu = "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"
    assert views["model.layers.0.self_attn.q_proj.weight"] == WeightView(qkv, 0, 256)
    assert views["model.layers.0.self_attn.k_proj.weight"] == WeightView(qkv, 256, 384)
    assert views["model.layers.0.self_attn.v_proj.weight"] == WeightView(qkv, 384, 512)
    assert views["model.layers.0.mlp.gate_proj.weight"] == WeightView(gu, 0, 688)
    assert views["model.layers.0.mlp.up_proj.weight"] == WeightView(gu, 688, 1376)
    assert views["model.embed_tokens.weight"] == WeightView("model.embed_tokens.weight", 0, 500)
    assert views["model.norm.weight"] == WeightView("model.norm.weight", 0, 256)
    assert "model.layers.0.self_attn.qkv_proj.weight" not in views


def test_views_of_biases_and_tied_embeddings() -> None:
    shape = LlamaShape(4, 2, 8, 16, 100, tie_word_embeddings=True)
    views = hf_weight_views(shape, {"model.layers.3.self_attn.qkv_proj.bias": (64,),
                                    "model.embed_tokens.weight": (128, 32)})
    assert views["model.layers.3.self_attn.v_proj.bias"].row_start == 48
    assert views["lm_head.weight"] == views["model.embed_tokens.weight"]


def test_views_refuse_tensors_that_do_not_match_the_config() -> None:
    shape = LlamaShape(4, 2, 64, 688, 500)
    with pytest.raises(WeightShareError, match=r"qkv_proj.weight has 256 rows.*256 \+ 128 \+ 128"
                                               r".*tensor-parallel"):
        hf_weight_views(shape, {"model.layers.0.self_attn.qkv_proj.weight": (256, 256)})
    with pytest.raises(WeightShareError, match="fewer than the vocabulary"):
        hf_weight_views(shape, {"lm_head.weight": (256, 256)})


def test_peft_names_map_to_base_names() -> None:
    assert hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight")
    assert hf_name("lm_head.weight") == "lm_head.weight"


def test_fused_tensors_look_like_vllms() -> None:
    model = _tiny_model()
    fused = fused_from_hf(model.state_dict(), LlamaShape.from_config(model.config))
    assert fused["model.layers.0.self_attn.qkv_proj.weight"].shape == (256 + 128 + 128, 256)
    assert fused["model.layers.1.mlp.gate_up_proj.weight"].shape == (2 * 688, 256)
    assert fused["model.embed_tokens.weight"].shape == (512, 256)  # 500 padded to 64
    assert not any(".q_proj." in n or ".up_proj." in n for n in fused)


# ---------------------------------------------------------------------------------------------
# Shared weights: binding on CPU
# ---------------------------------------------------------------------------------------------


def _inside(t: torch.Tensor, storage: torch.Tensor) -> bool:
    lo = storage.data_ptr()
    hi = lo + storage.numel() * storage.element_size()
    return lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi


def test_a_fresh_model_bound_to_fused_weights_gives_identical_logits() -> None:
    ref = _tiny_model()
    fused = fused_from_hf(ref.state_dict(), LlamaShape.from_config(ref.config))
    model = build_shared_model(ref.config, fused).eval()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, model(ids).logits)
    attn = model.model.layers[2].self_attn
    qkv = fused["model.layers.2.self_attn.qkv_proj.weight"]
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert _inside(proj.weight, qkv) and not proj.weight.requires_grad
    assert attn.k_proj.weight.data_ptr() == qkv.data_ptr() + 256 * 256 * 4
    assert _inside(model.lm_head.weight, fused["lm_head.weight"])
    # No parameter owns memory of its own: every one views a shared tensor.
    assert all(any(_inside(p, t) for t in fused.values()) for p in model.parameters())


def test_binding_a_built_model_frees_nothing_it_should_keep_and_copies_nothing() -> None:
    ref = _tiny_model()
    fused = fused_from_hf(ref.state_dict(), LlamaShape.from_config(ref.config))
    target = _tiny_model()
    report = bind_shared_weights(target, fused)
    assert report.parameters == len(list(target.named_parameters()))
    assert report.shared_bytes == sum(t.numel() * t.element_size() for t in fused.values())
    fused["model.norm.weight"][0] = 123.0  # decode's memory changes: the view sees it
    assert float(target.model.norm.weight[0]) == 123.0


def test_binding_under_peft_keeps_the_adapters_trainable() -> None:
    from peft import LoraConfig, get_peft_model

    ref = _tiny_model()
    fused = fused_from_hf(ref.state_dict(), LlamaShape.from_config(ref.config))
    model = build_shared_model(ref.config, fused)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {n: t.clone() for n, t in fused.items()}
    ids = torch.randint(0, 500, (2, 8))
    peft(input_ids=ids, labels=ids).loss.backward()
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(torch.equal(before[n], fused[n]) for n in fused)
    # Binding again, through PEFT's names, is also fine.
    assert bind_shared_weights(peft, fused).parameters == len(list(ref.named_parameters()))


def test_tied_embeddings_bind_to_one_view() -> None:
    ref = _tiny_model(tie_word_embeddings=True)
    fused = fused_from_hf(ref.state_dict(), LlamaShape.from_config(ref.config))
    assert "lm_head.weight" not in fused
    model = build_shared_model(ref.config, fused).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 500, (1, 6))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, model(ids).logits)


def test_binding_fails_loudly_and_changes_nothing() -> None:
    ref = _tiny_model()
    fused = fused_from_hf(ref.state_dict(), LlamaShape.from_config(ref.config))
    target = _tiny_model()
    keep = target.model.norm.weight
    missing = dict(fused)
    del missing["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(WeightShareError, match=r"layers.1.mlp.down_proj.weight: no shared tensor"):
        bind_shared_weights(target, missing)
    wrong = dict(fused)
    wrong["model.layers.0.mlp.down_proj.weight"] = torch.zeros(256, 600)
    with pytest.raises(WeightShareError, match=r"down_proj.weight: HF expects \(256, 688\)"):
        bind_shared_weights(target, wrong)
    half = {n: t.to(torch.bfloat16) for n, t in fused.items()}
    with pytest.raises(WeightShareError, match=r"build the finetune model in torch.bfloat16"):
        bind_shared_weights(target, half)
    extra = {**fused, "model.layers.0.self_attn.rotary.weight": torch.zeros(4)}
    with pytest.raises(WeightShareError, match=r"rotary.weight: shared but no HF parameter"):
        bind_shared_weights(target, extra)
    assert target.model.norm.weight is keep


# ---------------------------------------------------------------------------------------------
# Shared weights: export / import over the fake runtime
# ---------------------------------------------------------------------------------------------


class _FakeCudaTensor:
    """A host tensor that says it is on cuda:0 (export only reads device, pointer, shape,
    stride and dtype)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.device = torch.device("cuda", 0)
        self.shape, self.dtype = t.shape, t.dtype

    def data_ptr(self) -> int:
        return int(self.t.data_ptr())

    def stride(self) -> tuple[int, ...]:
        return tuple(self.t.stride())


def _in_fake_allocations(rt: FakeRuntime, tensors: dict[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
    """Copy ``tensors`` into two fake device allocations (as a caching allocator packs them)."""
    out = {}
    blocks = [rt.blocks[rt.malloc(16 * MIB, 0)] for _ in range(2)]
    used = [0, 0]
    for i, (name, t) in enumerate(tensors.items()):
        b = i % 2
        n = t.numel() * t.element_size()
        view = blocks[b][used[b]:used[b] + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        out[name] = view
        used[b] += -(-n // 512) * 512
    return out


def test_export_then_import_elsewhere_gives_the_same_tensors(
        rt: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _tiny_model()
    fused = _in_fake_allocations(rt, fused_from_hf(ref.state_dict(),
                                                   LlamaShape.from_config(ref.config)))
    exports = export_weights(((n, _FakeCudaTensor(t)) for n, t in fused.items()),  # type: ignore[misc]
                             runtime=rt)
    assert len({e.handle for e in exports}) == 2
    msg = WeightsExported(generation=2, model="tiny", exports=tuple(exports))
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=WeightsExported)
    assert wire == msg
    _as_other_process(monkeypatch)
    got = import_weights(wire.exports, runtime=rt)
    assert len(rt.opened) == 2  # each allocation mapped once
    for name, t in fused.items():
        assert torch.equal(got[name], t) and got[name].data_ptr() == t.data_ptr()
    model = build_shared_model(ref.config, got).eval()
    ids = torch.randint(0, 500, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    del model, got
    gc.collect()
    assert sorted(rt.closed) == sorted(set(rt.opened))  # unmapped with the last view


def test_import_in_the_exporting_process_views_the_memory_directly(rt: FakeRuntime) -> None:
    t = _in_fake_allocations(rt, {"w": torch.arange(12.0).reshape(3, 4)})["w"]
    exports = export_weights([("w", _FakeCudaTensor(t))], runtime=rt)  # type: ignore[list-item]
    got = import_weights(exports, runtime=rt)
    assert rt.opened == [] and got["w"].data_ptr() == t.data_ptr()
    del got
    gc.collect()
    assert rt.closed == [] and rt.freed == []  # torch's memory: nothing of ours to release


def test_export_refuses_host_tensors() -> None:
    with pytest.raises(WeightShareError, match="is on cpu"):
        export_weights([("w", torch.zeros(2))], runtime=FakeRuntime())


def test_strided_exports_keep_their_strides(rt: FakeRuntime,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    base = _in_fake_allocations(rt, {"w": torch.arange(24.0).reshape(4, 6)})["w"]
    col = base[:, 1:3]  # non-contiguous
    exports = export_weights([("c", _FakeCudaTensor(col))], runtime=rt)  # type: ignore[list-item]
    assert exports[0].stride == (6, 1) and exports[0].offset_bytes == 4
    _as_other_process(monkeypatch)
    assert torch.equal(import_weights(exports, runtime=rt)["c"], col)


def test_span_bytes() -> None:
    assert span_bytes((4, 6), (6, 1), 4) == 96
    assert span_bytes((4, 2), (6, 1), 4) == (3 * 6 + 1 + 1) * 4
    assert span_bytes((0, 6), (6, 1), 4) == 0
    assert span_bytes((), (), 2) == 2
    with pytest.raises(WeightShareError, match="differ in rank"):
        span_bytes((2,), (1, 1), 4)


def _export(**kw: Any) -> WeightExport:
    fields = {"name": "w", "handle": "ab" * 64, "alloc_bytes": 1024, "offset_bytes": 0,
              "shape": (4, 4), "stride": (4, 1), "dtype": "float32"}
    fields.update(kw)
    return WeightExport(**fields)


@pytest.mark.parametrize(("kw", "problem"), [
    ({"offset_bytes": 1000}, r"bytes \[1000, 1064\) outside its allocation of 1024"),
    ({"offset_bytes": 2}, "not aligned to float32"),
    ({"dtype": "complex64"}, "cannot be shared"),
    ({"handle": "ab"}, "128 hex characters"),
])
def test_invalid_exports_are_refused_before_mapping(kw: dict[str, Any], problem: str) -> None:
    with pytest.raises((WeightShareError, ArenaError), match=problem):
        validate_export(_export(**kw))
    validate_export(_export())


# ---------------------------------------------------------------------------------------------
# gpu-check: report arithmetic, and a run without CUDA
# ---------------------------------------------------------------------------------------------


def test_latency_summary_and_percentiles() -> None:
    s = rep.latency_summary([float(x) for x in range(1, 101)])
    assert s["median_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01)
    assert s["n"] == 100 and s["max_ms"] == 100
    assert rep.percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError, match="no latency samples"):
        rep.latency_summary([])


def test_overlap_tells_concurrency_from_time_slicing() -> None:
    sliced = rep.overlap_figures(1.0, [(0.0, 2.0), (0.05, 2.0)])
    concurrent = rep.overlap_figures(1.0, [(0.0, 1.0), (0.0, 1.02)])
    assert sliced["overlap"] == pytest.approx(1.975) and sliced["slowdown_vs_solo"] == 2.0
    assert concurrent["overlap"] == pytest.approx(2.02 / 1.02)
    with pytest.raises(ValueError, match="positive solo time"):
        rep.overlap_figures(0.0, [(0, 1)])


def test_gemm_tflops_and_corun_rows() -> None:
    assert rep.gemm_tflops(8192, 8192, 8192, 1.1e-3) == pytest.approx(999.5, rel=1e-3)
    rows = rep.corun_rows({"median_ms": 10.0, "p99_ms": 20.0},
                          {2: {"median_ms": 15.0, "p99_ms": 30.0},
                           1: {"median_ms": 11.0, "p99_ms": 40.0}})
    assert [r["level"] for r in rows] == [1, 2]
    assert rows[0]["median_ratio"] == pytest.approx(1.1) and rows[0]["p99_ratio"] == 2.0


def test_report_round_trips(tmp_path: Path) -> None:
    r = rep.new_report()
    r.sections.append(rep.Section(name="mps", status="ok", figures={"overlap": 1.9}))
    r.sections.append(rep.Section(name="cuda_ipc", status="skipped", reason="--only"))
    rep.write_report(tmp_path / "r.json", r.finish())
    back = msgspec.json.decode((tmp_path / "r.json").read_bytes(), type=rep.GpuCheckReport)
    assert back.ok and back.sections[0].figures == {"overlap": 1.9}
    r.sections.append(rep.Section(name="arena_kv", status="error", reason="boom"))
    assert not r.finish().ok


@pytest.mark.multiproc
def test_gpu_check_without_cuda_writes_why_and_fails(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "harli.cli.main", "gpu-check", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2
    assert "CUDA is not available here" in p.stderr and str(out) in p.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is False and "run harli gpu-check on a GPU host" in report["error"]
    assert report["host"]["cuda_available"] is False and report["host"]["torch"]


def test_sections_record_ok_skipped_and_errors(tmp_path: Path) -> None:
    from harli.gpu_check.checks import CheckOptions, _Run, _section

    report = rep.new_report()
    run = _Run(CheckOptions(out=tmp_path / "r.json", sections=("mps", "cuda_ipc", "arena_kv")))

    def boom(_: Any) -> dict[str, Any]:
        raise RuntimeError("cudaIpcOpenMemHandle failed: cudaErrorMapBufferObjectFailed (205)")

    _section(report, run, "mps", lambda _: {"overlap": 1.9})
    _section(report, run, "cuda_ipc", boom)
    _section(report, run, "arena_kv", lambda _: {"skipped": "no arena here", "x": 1})
    _section(report, run, "shared_weights", lambda _: {"never": "run"})
    got = [(s.name, s.status, s.reason, s.figures) for s in report.sections]
    assert got == [
        ("mps", "ok", "", {"overlap": 1.9}),
        ("cuda_ipc", "error", "cudaIpcOpenMemHandle failed: cudaErrorMapBufferObjectFailed "
                              "(205)", {}),
        ("arena_kv", "skipped", "no arena here", {"x": 1}),
        ("shared_weights", "skipped", "not selected (--only)", {}),
    ]
    assert not report.finish().ok


@pytest.mark.multiproc
def test_a_failing_worker_reports_its_traceback() -> None:
    import os

    from harli.gpu_check.checks import Worker, WorkerError

    w = Worker("busy", {}, dict(os.environ), timeout_s=120)
    try:
        with pytest.raises(WorkerError,
                           match=r"(?s)busy worker failed: .*not compiled with CUDA.*Traceback"):
            w.expect("ready")
    finally:
        w.close()


def test_gpu_check_rejects_unknown_sections() -> None:
    from harli.cli.main import main

    assert main(["gpu-check", "--only", "mps,warp_drive"]) == 2


# ---------------------------------------------------------------------------------------------
# Every new module imports on a CPU host (no cuda-python, CPU torch)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [
    "harli.arena.cuda", "harli.ipc.weights", "harli.finetune_proc.gpu_quota",
    "harli.finetune_proc.green_contexts", "harli.finetune_proc.shared_weights",
    "harli.gpu_check.checks", "harli.gpu_check.report", "harli.gpu_check.worker",
])
def test_module_imports_without_cuda(module: str) -> None:
    code = f"import {module}, sys; sys.exit('cuda' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert importlib.import_module(module).__doc__
