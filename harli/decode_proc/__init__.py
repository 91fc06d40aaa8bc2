"""Decode process: drives a vLLM V1 engine in-process, one ``step()`` at a time, in our loop.

``engine.DecodeEngine`` is the logic (vLLM, no sockets); ``proc.DecodeProc`` is the transport
and loop; ``python -m harli.decode_proc`` is the entry the daemon spawns.
"""
