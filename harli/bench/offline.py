"""vLLM's own offline path (``LLM.generate``) on the daemon's engine settings: the baseline that
the overhead benchmark and the greedy-equality test compare the daemon against.

``OfflineRunner`` keeps one ``LLM`` loaded in a child process (``python -m
harli.bench.offline``), with vLLM in-process and the same environment as decode_proc, so that
the only difference measured is our serving path, and so that benchmark rounds of the two can
be interleaved. Protocol: one JSON line per job on stdin, one JSON line per result on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from harli.config import HarliConfig, child_environ, from_json, parse_cpu_list
from harli.runtime import decode_cores, format_cpu_list, pin_to


class OfflineRunner:
    def __init__(self, cfg: HarliConfig, max_lora_rank: int = 0) -> None:
        """``max_lora_rank`` > 0 enables vLLM's LoRA support (``generate(lora_path=...)``)."""
        self.cfg = cfg
        self.max_lora_rank = max_lora_rank
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> OfflineRunner:
        cores = decode_cores(self.cfg.decode.cpu_cores, self.cfg.decode.cpu_threads)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harli.bench.offline", self.cfg.to_json().decode(),
             format_cpu_list(cores), str(self.max_lora_rank)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=child_environ(self.cfg))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def sample(self, prompt: list[int], sampling_params: dict[str, Any]) -> dict[str, Any]:
        """One ``LLM.generate`` of ``prompt`` with ``SamplingParams(**sampling_params)``:
        every completion (by index: ``token_ids``, ``text``, ``finish_reason``,
        ``cumulative_logprob``, ``logprobs`` as per-position lists of ``[token_id, logprob,
        rank, decoded_token]`` in vLLM's order) and ``prompt_logprobs`` in the same form."""
        return self._ask({"sample": prompt, "sampling_params": sampling_params})

    def generate(self, prompts: list[list[int]] | list[str], max_tokens: int,
                 lora_path: str | None = None, logprobs: int = 0) -> dict[str, Any]:
        """Greedy, ``ignore_eos`` generation of all ``prompts`` (token ids or text) in one
        ``LLM.generate`` call, optionally through a LoRA adapter; returns ``token_ids``,
        ``text`` and ``elapsed_s``, and with ``logprobs`` > 0 also ``logprobs``: per prompt,
        per output position, the top ``logprobs`` as ``{token_id: logprob}``."""
        result = self._ask({"prompts": prompts, "max_tokens": max_tokens,
                            "lora_path": lora_path, "logprobs": logprobs})
        if "logprobs" in result:  # JSON keys are strings
            result["logprobs"] = [[{int(t): lp for t, lp in pos.items()} for pos in out]
                                  for out in result["logprobs"]]
        return result

    def _ask(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"offline vLLM process died (exit {self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result


def _positions(logprobs: Any) -> list[Any] | None:
    """vLLM's per-position ``{token_id: Logprob}`` maps as lists, in their order."""
    if logprobs is None:
        return None
    return [None if pos is None else [[t, lp.logprob, lp.rank, lp.decoded_token]
                                      for t, lp in pos.items()] for pos in logprobs]


def _sample(llm: Any, job: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    params = dict(job["sampling_params"])
    if params.get("logit_bias"):  # JSON keys are strings
        params["logit_bias"] = {int(t): b for t, b in params["logit_bias"].items()}
    (out,) = llm.generate([{"prompt_token_ids": job["sample"]}], SamplingParams(**params),
                          use_tqdm=False)
    return {"completions": [{"index": c.index, "token_ids": list(c.token_ids), "text": c.text,
                             "finish_reason": c.finish_reason,
                             "cumulative_logprob": c.cumulative_logprob,
                             "logprobs": _positions(c.logprobs)} for c in out.outputs],
            "prompt_logprobs": _positions(out.prompt_logprobs)}


def _serve(cfg: HarliConfig, max_lora_rank: int) -> None:
    # Results go to the original stdout; everything else (vLLM logs to stdout) to stderr.
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from vllm import LLM, SamplingParams

    from harli.vllm_args import engine_args

    args = engine_args(cfg, str(cfg.model_path))
    from vllm.lora.request import LoRARequest

    lora: dict[str, Any] = {"enable_lora": True, "max_lora_rank": max_lora_rank} \
        if max_lora_rank else {}
    llm = LLM(**{k: getattr(args, k) for k in (
        "model", "dtype", "max_num_seqs", "enforce_eager", "gpu_memory_utilization",
        "max_model_len")}, disable_log_stats=True, **lora)
    adapters: dict[str, int] = {}
    for line in sys.stdin:
        job = json.loads(line)
        if "sample" in job:
            results.write(json.dumps(_sample(llm, job)) + "\n")
            results.flush()
            continue
        sp = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True,
                            logprobs=job.get("logprobs") or None)
        inputs: Any = [p if isinstance(p, str) else {"prompt_token_ids": p}
                       for p in job["prompts"]]
        request = None
        if job.get("lora_path"):
            path = job["lora_path"]
            request = LoRARequest(f"adapter-{len(adapters) + 1}",
                                  adapters.setdefault(path, len(adapters) + 1), path)
        t0 = time.perf_counter()
        outs = llm.generate(inputs, sp, use_tqdm=False, lora_request=request)
        elapsed = time.perf_counter() - t0
        result: dict[str, Any] = {"token_ids": [list(o.outputs[0].token_ids) for o in outs],
                                  "text": [o.outputs[0].text for o in outs],
                                  "elapsed_s": elapsed}
        if job.get("logprobs"):
            result["logprobs"] = [[{t: lp.logprob for t, lp in (pos or {}).items()}
                                   for pos in (o.outputs[0].logprobs or [])] for o in outs]
        results.write(json.dumps(result) + "\n")
        results.flush()


if __name__ == "__main__":
    # Pinned exactly as decode_proc is, so the comparison is like for like.
    pin_to(None if sys.argv[2] == "none" else parse_cpu_list(sys.argv[2]), "offline")
    _serve(from_json(sys.argv[1]), int(sys.argv[3]))
