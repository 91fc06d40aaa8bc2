"""vLLM's KV cache placed in the shared arena (the patch point of ``harli.decode_proc.kv_arena``):
every KV tensor views the arena, and greedy outputs equal those of vLLM's own private
allocation."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_engine_script

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

SCRIPT = r"""
import json, sys, uuid
from harli.config import load
from harli.arena.shm import ShmArena
from harli.ipc.inference import Generate
use_arena, model = sys.argv[1] == "arena", sys.argv[2]
cfg = load(None, ['model.dtype="float32"', f'model.path="{model}"', "decode.max_num_seqs=8"])
if use_arena:
    from harli.decode_proc import kv_arena
    arena = ShmArena.create(f"harli-kvtest-{uuid.uuid4().hex[:8]}", (1 << 30) + (64 << 20))
    mode = kv_arena.install(arena)
from harli.decode_proc.engine import DecodeEngine
eng = DecodeEngine(cfg)
for i in range(4):
    eng.add(f"r{i}", Generate(request_id="x", prompt_token_ids=[10 + i, 20, 30, 40],
                              max_tokens=24, temperature=0.0, ignore_eos=True))
out = {}
while eng.has_work():
    for o in eng.step().outputs:
        out.setdefault(o.rid, []).extend(t for c in o.completions for t in c.token_ids)
res = {"out": out}
if use_arena:
    runner = eng.llm.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    kv = runner.kv_caches
    base = arena.tensor(0, 16).data_ptr()
    res["in_arena"] = [base <= t.data_ptr() < base + arena.handle.size_bytes
                       for t in (kv if isinstance(kv, list) else kv.values())]
    res["nbytes"] = mode.nbytes
    arena.close()
sys.stdout.write("RESULT " + json.dumps(res) + "\n")
"""


def test_kv_cache_in_the_arena_gives_identical_greedy_outputs(tiny_model: Path) -> None:
    private = run_engine_script(SCRIPT, "private", str(tiny_model))
    shared = run_engine_script(SCRIPT, "arena", str(tiny_model))
    assert shared["in_arena"] and all(shared["in_arena"])  # type: ignore[arg-type]
    assert shared["nbytes"] == 1 << 30  # VLLM_CPU_KVCACHE_SPACE=1
    assert shared["out"] == private["out"]
