"""Harli against ``vllm serve`` through a real OpenAI client, lm-evaluation-harness: the same
tiny model, the same three small local tasks (tests/data/lm_eval), run by ``lm_eval``'s
``local-completions`` model against both servers; every request's answer and every task score
must agree.

``local-completions`` scores a continuation by sending context + continuation as token ids to
/v1/completions with ``echo`` and ``logprobs`` and summing the prompt logprobs of the
continuation's tokens (vLLM's prompt logprobs, through Harli's daemon and decode process). The
tasks: multiple choice (20 questions x 4 choices: ``acc``, ``acc_norm``), rolling loglikelihood
of 5 texts from the BOS token (perplexities), and greedy generation of 6 prompts
(``exact_match``). The model is random, so the scores mean nothing; they must be equal. Each
request's loglikelihood agrees within 1e-4 (the engines batch differently; float32 sums differ
in the last bits), its is-greedy flag and each generated text exactly.

Both servers run with LoRA serving off: vLLM 0.32's CPU LoRA logits path fails on prompt
positions, so with it on Harli refuses ``echo`` + ``logprobs`` (400) and ``vllm serve
--enable-lora``'s engine dies (docs/http.md). Nothing here needs the network: the tokenizer
is the model's directory, the data local JSON, and the evaluation runs in a child with the
Hugging Face libraries offline.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harli.bench.http_serving import vllm_serving, wait_http
from harli.bench.local_daemon import LocalDaemon

from .conftest import free_port, make_daemon

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "lm_eval"
LOGLIKELIHOOD_TASKS = ["harli_tiny_mc", "harli_tiny_ppl"]
GENERATE_TASKS = ["harli_tiny_gen"]
# Requests per task: 20 questions x 4 choices, 5 texts (each one window: they are far
# shorter than the model's length), 6 prompts.
REQUESTS = {"harli_tiny_mc": 80, "harli_tiny_ppl": 5, "harli_tiny_gen": 6}
LL_ABS_TOL = 1e-4


@pytest.fixture(scope="module")
def evals(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
          ) -> dict[str, dict[str, Any]]:
    """lm_eval's results against each server: ``{"harli": ..., "vllm": ...}`` as
    run_lm_eval.py writes them (per task: metrics, and each document's answers). Both servers
    are stopped before the tests compare them."""
    base = tmp_path_factory.mktemp("lm_eval")
    port, vport = free_port(), free_port()
    daemon: LocalDaemon = make_daemon(base / "d", tiny_model, f"http.port={port}",
                                      'scheduler.policy="decode-only"',
                                      "finetune.enabled=false", "lora.enabled=false")
    assert not daemon.cfg.lora.enabled
    log = base / "vllm.log"
    # vllm serve with the daemon's engine settings; start_vllm adds --enable-lora only when
    # the configuration serves LoRA, which it does not here.
    with vllm_serving(daemon.cfg, vport, log) as vllm, daemon:
        assert "--enable-lora" not in vllm.args
        harli, vbase = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{vport}"
        wait_http(harli, None, daemon.log_path)
        wait_http(vbase, vllm, log)
        out = base / "lm_eval.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(base / "hf"),
               "TOKENIZERS_PARALLELISM": "false"}
        res = subprocess.run(
            [sys.executable, "run_lm_eval.py", str(out), tiny_model.name,
             str(tiny_model), harli, vbase],
            cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=240,
            check=False)
        assert res.returncode == 0, res.stderr[-4000:]
        data = json.loads(out.read_text())
    return {"harli": data[harli], "vllm": data[vbase]}


def _requests(run: dict[str, Any], task: str) -> list[tuple[str, int, Any, Any]]:
    """(doc id, request index, arguments, answer) of each request of ``task``, in order."""
    rows = []
    for doc, sample in sorted(run["samples"][task].items(), key=lambda kv: int(kv[0])):
        assert len(sample["arguments"]) == len(sample["resps"])
        for i, (args, resp) in enumerate(zip(sample["arguments"], sample["resps"],
                                             strict=True)):
            (answer,) = resp  # one answer per request (no repeats)
            rows.append((doc, i, args, answer))
    return rows


@pytest.mark.parametrize("task", LOGLIKELIHOOD_TASKS)
def test_loglikelihoods_match(evals: dict[str, dict[str, Any]], task: str) -> None:
    ours, theirs = (_requests(evals[s], task) for s in ("harli", "vllm"))
    assert len(ours) == len(theirs) == REQUESTS[task]
    worst = 0.0
    for (doc, i, args, a), (doc2, i2, args2, b) in zip(ours, theirs, strict=True):
        assert (doc, i, args) == (doc2, i2, args2)
        where = f"{task} doc {doc} request {i} {args}"
        a, b = (x if isinstance(x, list) else [x] for x in (a, b))
        assert math.isfinite(a[0]) and a[0] < 0, f"{where}: harli {a}"
        assert abs(a[0] - b[0]) <= LL_ABS_TOL, f"{where}: harli {a} != vllm {b}"
        assert a[1:] == b[1:], f"{where}: is_greedy harli {a} != vllm {b}"
        worst = max(worst, abs(a[0] - b[0]))
    print(f"{task}: {len(ours)} loglikelihood requests, max |harli - vllm| = {worst:.3g}")


def test_generations_match(evals: dict[str, dict[str, Any]]) -> None:
    for task in GENERATE_TASKS:
        ours, theirs = (_requests(evals[s], task) for s in ("harli", "vllm"))
        assert len(ours) == len(theirs) == REQUESTS[task]
        assert ours == theirs
        assert any(answer for *_, answer in ours), "every generation empty"


def test_scores_match(evals: dict[str, dict[str, Any]]) -> None:
    ours, theirs = evals["harli"]["results"], evals["vllm"]["results"]
    for task in LOGLIKELIHOOD_TASKS + GENERATE_TASKS:
        assert ours[task].keys() == theirs[task].keys(), task
        for metric, value in ours[task].items():
            if "stderr" in metric:
                continue
            other = theirs[task][metric]
            if "perplexity" in metric or "bits_per_byte" in metric:
                # Functions of the summed loglikelihoods: equal up to their tolerance.
                assert math.isclose(value, other, rel_tol=1e-4), (task, metric, value, other)
            else:  # accuracies and exact match: counts of right answers, exactly equal
                assert value == other, (task, metric, value, other)
        print(f"{task}: harli {ours[task]} vllm {theirs[task]}")
