"""Harli: co-locate LLM decode serving (vLLM) with PEFT LoRA finetuning on one accelerator.

See ``docs/`` and the shared design notes for the architecture: a supervising daemon, a decode
process that steps vLLM one iteration at a time, and a finetune process, coordinated over ZeroMQ.
"""

__version__ = "0.1.0"
