"""Finetune process: PEFT LoRA jobs run as gated micro-steps.

``recipe.LoRARecipe`` trains one job (PEFT model, optimizer, checkpoints) and yields between a
micro-step's chunks; ``quota`` and ``gpu_quota`` apply the daemon's quota level to this
process's share of compute; ``inbox.Inbox`` reads the daemon's messages; ``proc.FinetuneProc``
is the loop (drain inputs, step, emit); ``python -m harli.finetune_proc`` is the entry the
daemon spawns.
"""
