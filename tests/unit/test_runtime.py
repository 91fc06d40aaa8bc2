"""harli.runtime: the scheduling class a child puts its threads in, checked on real
threads of a real child process (this test process keeps its own class)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import os, threading
from harli.runtime import set_cpu_scheduling
early = threading.Event()
t1 = threading.Thread(target=early.wait)
t1.start()                                  # a thread that exists before the call
set_cpu_scheduling({policy!r}, {nice}, "test")
late = threading.Event()
t2 = threading.Thread(target=late.wait)
t2.start()                                  # one started after: inherits it
for tid in sorted(os.listdir("/proc/self/task")):
    print(tid, os.sched_getscheduler(int(tid)), os.getpriority(os.PRIO_PROCESS, int(tid)))
early.set(); late.set(); t1.join(); t2.join()
"""


@pytest.mark.parametrize(("policy", "nice", "sched"), [("idle", 0, os.SCHED_IDLE),
                                                        ("batch", 7, os.SCHED_BATCH),
                                                        ("other", 5, os.SCHED_OTHER)])
def test_every_thread_present_and_later_gets_the_policy_and_nice(policy: str, nice: int,
                                                                 sched: int) -> None:
    out = subprocess.run([sys.executable, "-c", CHILD.format(policy=policy, nice=nice)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 3  # main, the early and the late thread
    assert {(int(s), int(n)) for _, s, n in rows} == {(sched, nice)}
