"""Finetune process (not built yet): PEFT LoRA trainer with gated micro-steps, datasets,
quota appliers (CPU threads/duty cycle, GPU green contexts), activation placement in the leased
arena pages, and atomic checkpoints. Spawned and supervised by the daemon like decode_proc."""
