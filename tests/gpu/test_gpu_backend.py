"""The GPU backend on a real GPU (marked ``gpu``: skipped without CUDA, and not run by default):
a CUDA arena across processes, a green-context stream switch, decode->finetune weight
export/import across processes, and ``harli gpu-check --quick`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

pytestmark = pytest.mark.gpu

MIB = 1 << 20


def _child(code: str, stdin: bytes = b"", timeout_s: float = 300) -> str:
    p = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True,
                       timeout=timeout_s, check=False)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    return p.stdout.decode()


def test_cuda_arena_is_shared_both_ways_across_processes() -> None:
    import torch

    from harli.arena.cuda import CudaArena
    from harli.arena.shm import page_range

    arena = CudaArena.create(8 * MIB, 2 * MIB)
    try:
        arena.tensor(*page_range(arena.handle, 1), torch.float32).fill_(1.5)
        torch.cuda.synchronize()
        code = (
            "import sys, msgspec, torch\n"
            "from harli.ipc.arena import ArenaHandle\n"
            "from harli.arena.shm import page_range\n"
            "from harli.arena.cuda import open_arena\n"
            "h = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=ArenaHandle)\n"
            "a = open_arena(h)\n"
            "off, n = page_range(h, 1)\n"
            "assert float(a.tensor(off, n, torch.float32).sum()) == 1.5 * n / 4\n"
            "a.tensor(*page_range(h, 2), torch.int32).fill_(7)\n"
            "torch.cuda.synchronize()\n"
            "a.close()\n"
        )
        _child(code, msgspec.msgpack.encode(arena.handle))
        assert bool((arena.tensor(*page_range(arena.handle, 2), torch.int32) == 7).all())
        assert int(arena.tensor(*page_range(arena.handle, 3)).sum()) == 0
        # The exporting process cannot open its own handle: attach reuses the mapping.
        same = CudaArena.attach(arena.handle)
        assert same.base_address == arena.base_address
        same.close()
    finally:
        arena.close()


def test_green_context_levels_switch_the_current_stream() -> None:
    import torch

    from harli.finetune_proc.gpu_quota import start_gpu_quota

    quota = start_gpu_quota(4, 0, "green_context")
    if quota.mode != "green_context":
        pytest.skip(f"green contexts unavailable here: {quota.reason}")
    default = torch.cuda.current_stream()
    quota.apply(1)
    low = torch.cuda.current_stream()
    x = torch.randn(1024, 1024, device="cuda")
    y = x @ x
    quota.apply(4)
    assert torch.cuda.current_stream() == default
    quota.apply(1)
    assert torch.cuda.current_stream() == low
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    assert quota.sm_counts[1] < quota.sm_counts[4] == torch.cuda.get_device_properties(
        0).multi_processor_count
    quota.close()


def test_weights_export_and_import_across_processes() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harli.arena.weights import export_weights
    from harli.finetune_proc.shared_weights import LlamaShape, fused_from_hf

    config = LlamaConfig(vocab_size=500, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda().eval()
    fused = fused_from_hf(model.state_dict(), LlamaShape.from_config(config))
    exports = export_weights(fused.items())
    ids = torch.randint(0, 500, (1, 8), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits[:, -1].float().flatten().tolist()
    payload = msgspec.json.encode({"exports": exports, "config": config.to_dict(),
                                   "ids": ids.tolist(), "ref": ref})
    code = (
        "import sys, msgspec, torch\n"
        "from transformers import LlamaConfig\n"
        "from harli.finetune_proc.shared_weights import build_shared_model\n"
        "from harli.arena.weights import import_weights\n"
        "from harli.ipc.weights import WeightExport\n"
        "d = msgspec.json.decode(sys.stdin.buffer.read())\n"
        "t = import_weights(msgspec.convert(d['exports'], list[WeightExport]))\n"
        "m = build_shared_model(LlamaConfig.from_dict(d['config']), t).eval()\n"
        "with torch.no_grad():\n"
        "    out = m(torch.tensor(d['ids'], device='cuda')).logits[:, -1].float().flatten()\n"
        "print(float((out - torch.tensor(d['ref'], device='cuda')).abs().max()))\n"
    )
    assert float(_child(code, payload).strip()) < 1e-4


def test_gpu_check_quick_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    p = subprocess.run([sys.executable, "-m", "harli.cli.main", "gpu-check", "--quick",
                        "--levels", "2", "--out", str(out)], capture_output=True, text=True,
                       timeout=1500, check=False)
    report = json.loads(out.read_text())
    assert report["host"]["cuda_available"] is True and report["host"]["device"]
    names = [s["name"] for s in report["sections"]]
    assert names == ["mps", "cuda_ipc", "green_contexts", "stage2_profile", "arena_kv",
                     "shared_weights"]
    failed = {s["name"]: s["reason"] for s in report["sections"] if s["status"] == "error"}
    assert p.returncode == (1 if failed else 0), p.stderr[-3000:]
    for name in ("cuda_ipc", "arena_kv", "shared_weights"):
        assert name not in failed, failed[name]
