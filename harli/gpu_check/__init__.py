"""``harli gpu-check``: runs each GPU mechanism Harli relies on (MPS, CUDA IPC, green contexts,
the arena as KV, shared weights) on this host and writes a report."""
