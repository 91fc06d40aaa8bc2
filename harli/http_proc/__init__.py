"""The OpenAI-compatible HTTP front: a process the daemon supervises, serving OpenAI's (and
vLLM's) HTTP API as a client of the daemon's native inference and control endpoints."""
