"""Serving LoRA adapters through the real daemon and vLLM: greedy outputs of two adapters and
the base model, mixed in one batch, equal transformers + PEFT token for token; adapters added,
listed and removed live; every bad adapter refused by name while decode serves everyone else;
the registry served again after a restart."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest

from harli.bench.lora import make_adapter
from harli.client.control import ControlClient
from harli.client.inference import AsyncInferenceClient, RequestError

from .conftest import make_daemon

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

PROMPTS = [[5, 17, 42, 99, 7], [300, 301, 302], [11, 12, 13, 14, 15, 16, 17, 18]]
MAX_TOKENS = 12


def peft_greedy(tiny_model: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by transformers (+ PEFT): argmax of the last position, n times; no EOS
    handling, as the daemon's ignore_eos."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


async def _mixed(endpoint: str, models: list[str | None]) -> dict[tuple[str | None, int],
                                                                    list[int]]:
    """Every prompt under every model, all at once (one batch mixes them)."""
    async with AsyncInferenceClient(endpoint, timeout_s=120) as client:
        keys = [(m, i) for m in models for i in range(len(PROMPTS))]
        done = await asyncio.gather(*(client.complete(PROMPTS[i], max_tokens=MAX_TOKENS,
                                                      temperature=0.0, ignore_eos=True,
                                                      model=m) for m, i in keys))
    return {k: c.token_ids for k, c in zip(keys, done, strict=True)}


def test_adapters_in_one_batch_match_peft_and_are_added_and_removed_live(
        tmp_path: Path, tiny_model: Path) -> None:
    a = make_adapter(tiny_model, tmp_path / "a", seed=1)
    b = make_adapter(tiny_model, tmp_path / "b", seed=2, r=4, targets=("k_proj", "up_proj"))
    with make_daemon(tmp_path / "d", tiny_model) as d, \
            ControlClient(d.cfg.control_endpoint) as ctl:
        ma = ctl.add_adapter("alpha", str(a))
        mb = ctl.add_adapter("beta", str(b))
        assert (ma.rank, mb.rank, ma.source) == (8, 4, "path")
        got = asyncio.run(_mixed(d.endpoint, [None, "alpha", "beta"]))
        models = {m.name: m for m in ctl.models()}
        assert list(models) == [tiny_model.name, "alpha", "beta"]
        assert models["alpha"].loaded and models["beta"].loaded
        # Removed: refused from then on, naming the models left; the others serve on.
        ctl.remove_adapter("beta")
        with pytest.raises(RequestError, match="unknown model 'beta'; this daemon serves"):
            asyncio.run(_mixed(d.endpoint, ["beta"]))
        assert asyncio.run(_mixed(d.endpoint, ["alpha"]))[("alpha", 0)] == got[("alpha", 0)]
    for (model, i), tokens in got.items():
        adapter = {None: None, "alpha": a, "beta": b}[model]
        assert tokens == peft_greedy(tiny_model, adapter, PROMPTS[i], MAX_TOKENS), \
            f"model {model}, prompt {i}"
    # The adapters changed the outputs (the comparison is not base against base).
    assert got[("alpha", 0)] != got[(None, 0)] and got[("beta", 0)] != got[(None, 0)]


def test_bad_adapters_are_refused_by_name_and_decode_serves_on(tmp_path: Path,
                                                               tiny_model: Path) -> None:
    good = make_adapter(tiny_model, tmp_path / "good", seed=1)
    big = make_adapter(tiny_model, tmp_path / "big", seed=1, r=32)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    doomed = tmp_path / "doomed"
    shutil.copytree(good, doomed)
    with make_daemon(tmp_path / "d", tiny_model) as d, \
            ControlClient(d.cfg.control_endpoint) as ctl:
        for name, path, words in (
                ("big", big, "rank 32, above the highest rank decode serves (16"),
                ("broken", broken, "cut short"),
                ("none", tmp_path / "missing", "does not exist"),
                ("rel", Path("relative/dir"), "must be absolute")):
            with pytest.raises(RequestError, match=re.escape(words)) as e:
                ctl.add_adapter(name, str(path))
            assert e.value.code == "invalid"
        ctl.add_adapter("good", str(good))
        with pytest.raises(RequestError, match="the name 'good' is taken") as e:
            ctl.add_adapter("good", str(good))
        assert e.value.code == "conflict"
        # Registered, then deleted before it was ever loaded: its requests fail with a reason,
        # everyone else's are served.
        ctl.add_adapter("doomed", str(doomed))
        shutil.rmtree(doomed)
        with pytest.raises(RequestError, match="adapter 'doomed' could not be loaded") as e:
            asyncio.run(_mixed(d.endpoint, ["doomed"]))
        assert e.value.code == "rejected"
        out = asyncio.run(_mixed(d.endpoint, [None, "good"]))
        assert all(len(t) == MAX_TOKENS for t in out.values())
        assert [m.name for m in ctl.models()] == [tiny_model.name, "good", "doomed"]


def test_a_finished_jobs_adapter_is_served_at_once_and_after_a_restart(
        tmp_path: Path, tiny_model: Path) -> None:
    from harli.datasets import SAMPLE_DATASET
    from harli.ipc.jobs import JobSpec

    with make_daemon(tmp_path / "d", tiny_model) as d, \
            ControlClient(d.cfg.control_endpoint) as ctl:
        job = ctl.attach(JobSpec(name="digits", dataset=str(SAMPLE_DATASET), max_steps=4,
                                 checkpoint_every=2, micro_batch_size=4, max_seq_len=64,
                                 publish_checkpoints=True,
                                 output_dir=str(tmp_path / "out")))
        for _ in range(600):
            if ctl.show(job.job_id).job.status in ("succeeded", "failed"):
                break
            asyncio.run(asyncio.sleep(0.2))
        detail = ctl.show(job.job_id)
        assert detail.job.status == "succeeded", detail.job.error
        assert detail.job.fine_tuned_model == "digits"
        names = [m.name for m in ctl.models()]
        assert names[1:] == ["digits@step-2", "digits@step-4", "digits"], names
        assert any(e.kind == "serving" and "served as model 'digits'" in e.message
                   for e in ctl.logs(job.job_id).events)
        first = asyncio.run(_mixed(d.endpoint, ["digits"]))
    with make_daemon(tmp_path / "d", tiny_model) as d, \
            ControlClient(d.cfg.control_endpoint) as ctl:
        assert [m.name for m in ctl.models()][1:] == ["digits@step-2", "digits@step-4",
                                                       "digits"]
        assert asyncio.run(_mixed(d.endpoint, ["digits"])) == first
