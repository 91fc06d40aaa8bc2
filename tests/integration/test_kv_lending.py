"""Lending vLLM's free KV blocks: withdrawn blocks are never used by decode, giving
them back restores the pool, and greedy outputs are the same with lending on and off, even when
the blocks come back full of NaN."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_engine_script

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

SCRIPT = r"""
import json, sys
from harli.config import load
from harli.decode_proc.engine import DecodeEngine
from harli.ipc.inference import Generate
lend, model = sys.argv[1] == "lend", sys.argv[2]
cfg = load(None, ['model.dtype="float32"', f'model.path="{model}"', "decode.max_num_seqs=8"])
eng = DecodeEngine(cfg)
total, free0 = eng.info.kv_blocks_total, eng.kv_blocks_free()
sched = eng.llm.engine_core.engine_core.scheduler
mgr = sched.kv_cache_manager

def blocks_in_use():
    return {b for rid in list(sched.requests) for b in mgr.get_blocks(rid).get_block_ids()[0]}

res, used, lent = {}, set(), []
if sys.argv[1] == "poison":
    # What a finetune leaves in the blocks it held: any bit pattern, NaN included. Every free
    # group is lent, filled with NaN in every layer and given back before any request runs,
    # so the requests below are served from those very blocks.
    import torch
    groups = eng.lend_groups(10**6, 8)
    ids = torch.tensor([b for g in groups for b in range(8 * g, 8 * g + 8)])
    for t in eng._kv_tensors():
        t[ids] = float("nan")
    eng.return_groups(groups)
    res["poisoned"] = len(ids)
    res["scrubbed_bytes"] = eng.scrubbed_bytes
for i in range(6):
    eng.add(f"r{i}", Generate(request_id="x", prompt_token_ids=[10 + i] * (100 + 37 * i),
                              max_tokens=40, temperature=0.0, ignore_eos=True))
out = {}
it = 0
while eng.has_work():
    if lend and it == 3:  # mid-generation: blocks are in use; only free groups may go
        busy = blocks_in_use()
        free_before = eng.kv_blocks_free()
        groups = eng.lend_groups(10**6, 8)  # everything that is wholly free
        lent = [b for g in groups for b in range(8 * g, 8 * g + 8)]
        res["lent"] = len(lent)
        res["busy_lent"] = sorted(busy & set(lent))
        res["free_drop"] = free_before - eng.kv_blocks_free()
        res["no_block_0"] = 0 not in groups
        try:
            eng.return_groups([10**9])
        except ValueError as e:
            res["bad_return"] = str(e)
    for o in eng.step().outputs:
        out.setdefault(o.rid, []).extend(t for c in o.completions for t in c.token_ids)
    it += 1
    if lend:
        used |= blocks_in_use()
res["out"] = out
if lend:
    res["overlap"] = sorted(used & set(lent))
    eng.return_groups(sorted({b // 8 for b in lent}))
    res["free_after_return"] = eng.kv_blocks_free()
res["free0"] = free0
res["total"] = total
sys.stdout.write("RESULT " + json.dumps(res) + "\n")
"""


@pytest.fixture(scope="module")
def plain(tiny_model: Path) -> dict[str, object]:
    return run_engine_script(SCRIPT, "plain", str(tiny_model))


def test_lent_blocks_are_never_used_and_outputs_do_not_change(
        tiny_model: Path, plain: dict[str, object]) -> None:
    lent = run_engine_script(SCRIPT, "lend", str(tiny_model))
    total = int(lent["total"])  # type: ignore[call-overload]
    # Most groups are wholly free mid-generation; the ones holding live blocks are not lent.
    assert total // 2 < int(lent["lent"]) < total  # type: ignore[call-overload]
    assert lent["free_drop"] == lent["lent"]
    assert lent["busy_lent"] == [] and lent["no_block_0"]
    assert "not lent" in str(lent["bad_return"])
    assert lent["overlap"] == []
    assert lent["free_after_return"] == lent["free0"]
    assert lent["out"] == plain["out"]


def test_returned_blocks_are_zeroed_so_what_the_finetune_left_never_reaches_outputs(
        tiny_model: Path, plain: dict[str, object]) -> None:
    poisoned = run_engine_script(SCRIPT, "poison", str(tiny_model))
    assert int(poisoned["poisoned"]) > 0  # type: ignore[call-overload]
    assert int(poisoned["scrubbed_bytes"]) > 0  # type: ignore[call-overload]
    # Unscrubbed, vLLM's CPU attention turned every token into 0 here.
    assert poisoned["out"] == plain["out"]
