"""Finetune process: PEFT LoRA jobs run as gated micro-steps.

``recipe.LoRARecipe`` trains one job (datasets, PEFT model, optimizer, checkpoints);
``quota`` maps the daemon's quota level to this process's share of compute; ``proc.FinetuneProc``
is the loop and sockets; ``python -m harli.finetune_proc`` is the entry the daemon spawns.
"""

from pathlib import Path

# The small dataset shipped with harli (alpaca records: number words -> digits), used by the
# demo, the benchmarks and the profiler as the representative job.
SAMPLE_DATASET = Path(__file__).resolve().parent / "data" / "digits.jsonl"
