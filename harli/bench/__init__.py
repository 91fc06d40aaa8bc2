"""Benchmarks and the latency profiler behind ``harli bench``, ``profile``, ``bench-memory`` and
``bench-overhead`` (their commands are in ``harli.cli``), the seeded workloads they replay, the
host probes they record, and the offline cost of a scheduling decision (``decision_cost``)."""
