"""How much this host's CPU speed drifts with nothing of ours running: a fixed pure-Python
loop on core 0, timed (best of 5) once a second. Usage: python docs/notes/host-drift.py 60"""

import os
import sys
import time


def work() -> int:
    s = 0
    for i in range(200_000):
        s += i * i
    return s


os.sched_setaffinity(0, {0})
t_end = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 60)
best: list[float] = []
while time.time() < t_end:
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        work()
        ts.append(time.perf_counter() - t)
    best.append(1000 * min(ts))
    time.sleep(1.0)
best.sort()
n = len(best)
print(f"{n} samples, best-of-5 ms: min {best[0]:.2f} p5 {best[n // 20]:.2f} "
      f"p50 {best[n // 2]:.2f} p95 {best[19 * n // 20]:.2f} max {best[-1]:.2f} "
      f"(p95/p5 {best[19 * n // 20] / best[n // 20]:.2f})")
