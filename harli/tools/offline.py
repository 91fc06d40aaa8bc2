"""vLLM's own offline path (``LLM.generate``) on the daemon's engine settings: the baseline that
the overhead benchmark and the greedy-equality test compare the daemon against.

Runs in its own process (``python -m harli.tools.offline``) with vLLM in-process, exactly as
decode_proc runs it, so that the only difference measured is our serving path. Reads a JSON job
on stdin and prints a JSON result on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from harli.config import HarliConfig, child_environ, from_json


def run_offline(cfg: HarliConfig, prompts: list[list[int]], max_tokens: int,
                repeats: int = 1) -> dict[str, Any]:
    """Greedy, ``ignore_eos`` generation of ``prompts``; returns outputs and timings."""
    from vllm import LLM, SamplingParams

    from harli.decode_proc.engine import engine_args

    args = engine_args(cfg, str(cfg.model_path))
    llm = LLM(**{k: getattr(args, k) for k in (
        "model", "dtype", "max_num_seqs", "enforce_eager", "gpu_memory_utilization",
        "max_model_len")}, disable_log_stats=True)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    inputs: Any = [{"prompt_token_ids": p} for p in prompts]
    elapsed = []
    outs: Any = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(inputs, sp, use_tqdm=False)
        elapsed.append(time.perf_counter() - t0)
    return {"token_ids": [list(o.outputs[0].token_ids) for o in outs], "elapsed_s": elapsed}


def run_offline_subprocess(cfg: HarliConfig, prompts: list[list[int]], max_tokens: int,
                           repeats: int = 1, timeout_s: float = 600) -> dict[str, Any]:
    job = {"config": cfg.to_json().decode(), "prompts": prompts, "max_tokens": max_tokens,
           "repeats": repeats}
    res = subprocess.run([sys.executable, "-m", "harli.tools.offline"], input=json.dumps(job),
                         capture_output=True, text=True, env=child_environ(cfg),
                         timeout=timeout_s, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"offline vLLM run failed ({res.returncode}):\n{res.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    job = json.load(sys.stdin)
    result = run_offline(from_json(job["config"]), job["prompts"], job["max_tokens"],
                         job.get("repeats", 1))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
