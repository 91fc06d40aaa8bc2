"""Finetune process: PEFT LoRA jobs run as gated micro-steps.

``recipe.LoRARecipe`` trains one job (PEFT model, optimizer, checkpoints); ``quota`` applies the
daemon's quota level to this process's share of compute; ``proc.FinetuneProc`` is the loop and
sockets; ``python -m harli.finetune_proc`` is the entry the daemon spawns.
"""
