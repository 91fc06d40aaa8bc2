"""The GPU backend wired into the real processes (marked ``gpu``: skipped without CUDA, not run
by default): decode's vLLM engine exports its weights and a finetune process trains LoRA on
views of them; the real daemon on a CUDA host (CUDA arena, weights relayed, GPU quota reported,
a job restarted from its checkpoint when decode dies).

Written without a GPU at hand: none of these has run yet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harli.datasets import SAMPLE_DATASET
from harli.ipc.jobs import JobSpec

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

# Runs in a child with decode_proc's environment (vLLM in-process). It builds the decode engine
# on CUDA, exports its weights and hands them to a second child, the finetune's recipe.
_DECODE = """
import json, subprocess, sys
import msgspec
from harli.config import load
from harli.decode_proc.engine import DecodeEngine, shares_weights
model, out = sys.argv[1], sys.argv[2]
cfg = load(None, [f'model.path="{model}"', 'model.dtype="float32"',
                  "decode.gpu_memory_utilization=0.3"])
eng = DecodeEngine(cfg, incarnation=1)
assert eng.info.device == "cuda" and shares_weights(cfg, eng.info.device), eng.info.device
w = eng.export_weights()
assert w.exports, "nothing exported (see the log above)"
p = subprocess.run([sys.executable, "-c", sys.argv[3], model, out], input=msgspec.msgpack.encode(w),
                   capture_output=True, timeout=600)
sys.stderr.write(p.stderr.decode()[-3000:])
assert p.returncode == 0
print("RESULT " + json.dumps({"exports": len(w.exports), "finetune": json.loads(
    p.stdout.decode().splitlines()[-1])}))
"""

_FINETUNE = """
import json, sys
import msgspec, torch
from transformers import AutoModelForCausalLM
from harli.datasets import SAMPLE_DATASET
from harli.finetune_proc.recipe import LoRARecipe, shared_base
from harli.ipc.jobs import JobSpec
from harli.ipc.weights import WeightsExported
model, out = sys.argv[1], sys.argv[2]
w = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=WeightsExported)
spec = JobSpec(name="g", dataset=str(SAMPLE_DATASET), output_dir=out, max_steps=2,
               micro_batch_size=4, max_seq_len=64)
r = LoRARecipe(spec, model, "cuda", shared_base("cuda", w, model))
r.setup()
ids = torch.randint(0, 400, (1, 16), device="cuda")
ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).cuda().eval()
with torch.no_grad(), r.model.disable_adapter():
    diff = float((r.model.eval()(input_ids=ids).logits - ref(ids).logits).abs().max())
r.model.train()
first = r.train_micro_step()
second = r.train_micro_step()
print(json.dumps({"source": r.base_source, "diff": diff, "loss": [first.loss, second.loss],
                  "device": str(next(r.model.parameters()).device)}))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harli.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def test_finetune_trains_on_the_decode_engines_exported_weights(tiny: Path,
                                                                tmp_path: Path) -> None:
    from harli.config import child_environ, load

    p = subprocess.run([sys.executable, "-c", _DECODE, str(tiny), str(tmp_path / "out"),
                        _FINETUNE], env=child_environ(load(None)), capture_output=True,
                       text=True, timeout=900, check=False)
    assert p.returncode == 0, p.stderr[-5000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    ft = res["finetune"]
    assert res["exports"] > 0 and ft["source"] == "decode", p.stderr[-3000:]
    assert ft["device"].startswith("cuda")
    assert ft["diff"] < 1e-4  # the base model on decode's weights is the model on disk
    assert all(loss == loss for loss in ft["loss"])  # trains (no NaN)


def _child(daemon_pid: int, module: str) -> int:
    for p in psutil.Process(daemon_pid).children():
        if module in " ".join(p.cmdline()):
            return p.pid
    raise AssertionError(f"no {module} child")


def test_daemon_on_a_cuda_host_shares_weights_and_restarts_the_job_when_decode_dies(
        tiny: Path, tmp_path: Path) -> None:
    import signal

    from harli.bench.local_daemon import LocalDaemon
    from harli.client.control import ControlClient

    overrides = [f'model.path="{tiny}"', 'model.dtype="float32"', 'scheduler.policy="static:2"',
                 "decode.gpu_memory_utilization=0.3", "supervisor.backoff_initial_s=0.2"]
    with LocalDaemon(tmp_path / "d", overrides) as d, \
            ControlClient(d.cfg.control_endpoint) as c:
        st = c.status()
        assert json.loads(st.finetune_quota)["mode"] in ("green_context", "mps_percentage")
        job = c.attach(JobSpec(name="shared", dataset=str(SAMPLE_DATASET),
                               output_dir=str(tmp_path / "out"), max_steps=40,
                               checkpoint_every=10, micro_batch_size=8, max_seq_len=128))
        deadline = time.monotonic() + 600
        while (j := c.show(job.job_id).job).step < 15:
            assert j.status != "failed", j.error
            assert time.monotonic() < deadline, j
            time.sleep(0.2)
        log = d.log_path.read_text(errors="replace")
        assert "arena" in log and "exported" in log and "base model on decode's weights" in log
        os.kill(_child(d.proc.pid, "harli.decode_proc"), signal.SIGKILL)  # type: ignore[union-attr]
        while (j := c.show(job.job_id).job).status != "succeeded":
            assert j.status != "failed", j.error
            assert time.monotonic() < deadline, j
            time.sleep(0.2)
        assert j.step == 40 and j.restarts >= 1
        log = d.log_path.read_text(errors="replace")
        assert "the finetune restarts and the job resumes from its last checkpoint" in log
        assert log.count("base model on decode's weights") >= 2  # rebuilt on the new decode's
