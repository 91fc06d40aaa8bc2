"""Run this directory's lm_eval tasks with ``local-completions`` against OpenAI servers.

    python run_lm_eval.py OUT.json MODEL TOKENIZER_DIR BASE_URL...

For each base URL (``http://host:port``): lm-evaluation-harness's own OpenAI completions
client sends the tasks' requests to ``BASE_URL/v1/completions`` one at a time, tokenizing
with the local tokenizer. OUT.json gets, per URL, each task's metrics and, per document, the
model's raw answers (``resps``: one ``[loglikelihood, is_greedy]``, ``[loglikelihood]`` or
generated text per request). Run from this directory (the task YAMLs name their data files
relative to it) with ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1``: nothing needs the network.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

TASKS = ["harli_tiny_mc", "harli_tiny_ppl", "harli_tiny_gen"]


def plain(value: Any) -> Any:
    """JSON-able: tuples to lists, numpy scalars to Python numbers."""
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if hasattr(value, "item"):
        return value.item()
    return value


def evaluate(base_url: str, model: str, tokenizer: str) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    here = Path(__file__).resolve().parent
    manager = TaskManager(include_path=str(here), include_defaults=False)
    t0 = time.monotonic()
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{base_url}/v1/completions", "model": model,
                    "tokenizer": tokenizer, "tokenizer_backend": "huggingface",
                    "num_concurrent": 1, "max_retries": 1, "timeout": 120},
        tasks=TASKS, task_manager=manager, log_samples=True, bootstrap_iters=0,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    assert out is not None
    return {
        "seconds": time.monotonic() - t0,
        "results": {t: {k: v for k, v in out["results"][t].items() if k != "alias"}
                    for t in TASKS},
        "samples": {t: {str(s["doc_id"]): {"arguments": plain(s["arguments"]),
                                           "resps": plain(s["resps"])}
                        for s in out["samples"][t]}
                    for t in TASKS},
    }


def main(argv: list[str]) -> None:
    out_path, model, tokenizer, *bases = argv
    result = {base: evaluate(base, model, tokenizer) for base in bases}
    Path(out_path).write_text(json.dumps(plain(result)))


if __name__ == "__main__":
    main(sys.argv[1:])
