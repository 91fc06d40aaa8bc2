"""Lending vLLM's free KV blocks (issue 4): withdrawn blocks are never used by decode, giving
them back restores the pool, and greedy outputs are the same with lending on and off."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_engine_script

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

SCRIPT = r"""
import json, sys
from harli.config import load
from harli.decode_proc.engine import DecodeEngine
from harli.ipc.messages import Generate
lend, model = sys.argv[1] == "lend", sys.argv[2]
cfg = load(None, ['model.dtype="float32"', f'model.path="{model}"', "decode.max_num_seqs=8"])
eng = DecodeEngine(cfg)
total, free0 = eng.info.kv_blocks_total, eng.kv_blocks_free()
res = {}
if lend:
    lent = eng.lend_blocks(free0 // 2)
    res["lent"] = len(lent)
    res["free_after_lend"] = eng.kv_blocks_free()
    try:
        eng.reclaim_blocks([10**9])
    except ValueError as e:
        res["bad_reclaim"] = str(e)
    used = set()
    sched = eng.llm.engine_core.engine_core.scheduler
for i in range(6):
    eng.add(f"r{i}", Generate(request_id="x", prompt_token_ids=[10 + i] * (100 + 37 * i),
                              max_tokens=40, temperature=0.0, ignore_eos=True))
out = {}
while eng.has_work():
    for o in eng.step().outputs:
        out.setdefault(o.rid, []).extend(o.token_ids)
    if lend:
        mgr = sched.kv_cache_manager
        for rid in list(sched.requests):
            for b in mgr.get_blocks(rid).get_block_ids()[0]:
                used.add(b)
res["out"] = out
if lend:
    res["overlap"] = sorted(used & set(lent))
    eng.reclaim_blocks(lent)
    res["free_after_reclaim"] = eng.kv_blocks_free()
res["free0"] = free0
sys.stdout.write("RESULT " + json.dumps(res) + "\n")
"""


def test_lent_blocks_are_never_used_and_outputs_do_not_change(tiny_model: Path) -> None:
    plain = run_engine_script(SCRIPT, "plain", str(tiny_model))
    lent = run_engine_script(SCRIPT, "lend", str(tiny_model))
    free0 = int(lent["free0"])  # type: ignore[call-overload]
    assert lent["lent"] == free0 // 2
    assert lent["free_after_lend"] == free0 - free0 // 2
    assert "not lent" in str(lent["bad_reclaim"])
    assert lent["overlap"] == []
    assert lent["free_after_reclaim"] == free0
    assert lent["out"] == plain["out"]
