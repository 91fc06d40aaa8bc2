"""Benchmarks and the latency profiler: ``harli bench``, ``profile``, ``bench-memory``,
``bench-overhead``, the seeded workloads they replay and the host probes they record."""
