"""Harli: co-locate LLM decode serving (vLLM) with PEFT LoRA finetuning on one accelerator.

A supervising daemon (``harli.daemon``), a decode process that steps vLLM one iteration at a
time (``harli.decode_proc``) and a finetune process that trains LoRA jobs in gated micro-steps
(``harli.finetune_proc``), coordinated over ZeroMQ. The package layout and its import rules are
in ``docs/design.md``.
"""

__version__ = "0.1.0"
