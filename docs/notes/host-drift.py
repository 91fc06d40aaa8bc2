"""How much this host's CPU speed drifts with nothing of ours running: the bench's host probe
(``harli.tools.bench_cmd.host_probe_ms``, best of 5 of a fixed pure-Python loop) on core 0,
once a second. Usage: .venv/bin/python docs/notes/host-drift.py 60"""

import os
import sys
import time

from harli.tools.bench_cmd import host_probe_ms

os.sched_setaffinity(0, {0})
t_end = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 60)
best: list[float] = []
while time.time() < t_end:
    best.append(host_probe_ms())
    time.sleep(1.0)
best.sort()
n = len(best)
print(f"{n} samples, best-of-5 ms: min {best[0]:.2f} p5 {best[n // 20]:.2f} "
      f"p50 {best[n // 2]:.2f} p95 {best[19 * n // 20]:.2f} max {best[-1]:.2f} "
      f"(p95/p5 {best[19 * n // 20] / best[n // 20]:.2f})")
