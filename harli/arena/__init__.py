"""The one memory arena the daemon creates and both children map: ``shm`` on CPU hosts,
``cuda`` (CUDA IPC) on GPU hosts, and ``weights``, decode's weights shared through CUDA IPC."""
