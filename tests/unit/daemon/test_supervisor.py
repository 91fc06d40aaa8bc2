"""The child state machine on a fake clock and fake OS, and the stop ladder on real processes."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import pytest

from harli.config import SupervisorConfig
from harli.daemon.supervisor import (
    Child,
    ChildExited,
    ChildFatal,
    ChildState,
    PopenOps,
    describe_returncode,
    stop_ladder,
)
from harli.runtime import EXIT_CONFIG

from .fake_procs import FakeOps

CFG = SupervisorConfig(start_timeout_s=10, stop_grace_s=0.01, term_timeout_s=0.01,
                       backoff_initial_s=1, backoff_max_s=4, start_retries=3,
                       stable_after_s=30)


def make(cfg: SupervisorConfig = CFG, **hooks: Any) -> tuple[Child, FakeOps]:
    ops = FakeOps()
    return Child("decode", lambda inc: ["x", str(inc)], {}, cfg, ops, **hooks), ops


def test_ready_handshake_moves_starting_to_running() -> None:
    c, _ = make()
    c.start(0.0)
    assert c.state is ChildState.STARTING
    assert not c.on_ready(incarnation=99, now=1.0)  # a stale incarnation is ignored
    assert c.on_ready(incarnation=1, now=1.0)
    assert c.state is ChildState.RUNNING
    assert c.transition(2.0) == []


def test_crash_backs_off_exponentially_then_restarts() -> None:
    c, ops = make()
    c.start(0.0)
    c.on_ready(1, 1.0)
    ops.procs[-1].returncode = -9
    ev = c.transition(5.0)
    assert ev == [ChildExited("decode", 1, -9, True)]
    assert c.state is ChildState.BACKOFF
    assert c.transition(5.5) == [] and c.state is ChildState.BACKOFF  # 1 s backoff
    c.transition(6.0)
    assert c.state is ChildState.STARTING and c.incarnation == 2 and c.restarts == 1
    ops.procs[-1].returncode = 1  # dies while starting: 2 s backoff now
    c.transition(7.0)
    c.transition(8.9)
    assert c.state is ChildState.BACKOFF
    c.transition(9.0)
    assert c.state is ChildState.STARTING and c.incarnation == 3


def test_a_restart_waits_while_may_start_says_no() -> None:
    gate = [False]
    c, ops = make(may_start=lambda: gate[0])
    c.start(0.0)
    c.on_ready(1, 0.5)
    ops.procs[0].returncode = 1
    c.transition(1.0)
    c.transition(5.0)  # past the backoff, but the gate is closed
    assert c.state is ChildState.BACKOFF and len(ops.procs) == 1
    gate[0] = True
    c.transition(5.1)
    assert c.state is ChildState.STARTING and c.incarnation == 2 and c.restarts == 1


def test_too_many_crashes_is_fatal() -> None:
    c, ops = make()
    c.start(0.0)
    now = 0.0
    events = []
    for _ in range(10):
        ops.procs[-1].returncode = 1
        now += 100
        events += c.transition(now)
        if c.state is ChildState.FATAL:
            break
        now += 100
        c.transition(now)
    assert c.state is ChildState.FATAL
    assert isinstance(events[-1], ChildFatal) and c.crashes == CFG.start_retries + 1
    assert c.transition(now + 1000) == []  # FATAL stays FATAL


def test_a_configuration_error_is_fatal_at_once() -> None:
    c, ops = make()
    c.start(0.0)
    ops.procs[-1].returncode = EXIT_CONFIG  # the child said its configuration is wrong
    events = c.transition(1.0)
    assert events == [ChildExited("decode", 1, EXIT_CONFIG, False), ChildFatal("decode", 1)]
    assert c.state is ChildState.FATAL and c.restarts == 0
    assert c.transition(1000.0) == [] and len(ops.procs) == 1  # never restarted


def test_forced_restarts_never_make_a_child_fatal() -> None:
    c, ops = make()
    c.start(0.0)
    now = 0.0
    for i in range(3 * CFG.start_retries):  # far more than the crashes FATAL allows
        c.on_ready(c.incarnation, now)
        c.restart("a sibling's GPU fault")
        assert ops.signals[-1] == (ops.procs[-1].pid, signal.SIGKILL)
        now += 1.0
        ev = c.transition(now)
        assert ev == [ChildExited("decode", i + 1, -9, True)]  # reported like any exit
        assert c.state is ChildState.BACKOFF and c.crashes == 0
        c.transition(now + CFG.backoff_initial_s)  # never more than the first delay
        assert c.state is ChildState.STARTING
        now += CFG.backoff_initial_s
    n = 3 * CFG.start_retries
    assert c.restarts == n and c.forced_restarts == n  # still counted, apart


def test_forced_restarts_leave_the_crash_count_alone() -> None:
    c, ops = make()
    c.start(0.0)
    now = 0.0
    for _ in range(CFG.start_retries):  # crash, then a forced restart: repeat
        ops.procs[-1].returncode = 1
        now += 100
        assert not any(isinstance(e, ChildFatal) for e in c.transition(now))
        now += 100
        c.transition(now)
        c.restart("decode's weights are gone")
        now += 100
        c.transition(now)
        now += 100
        c.transition(now)
    assert c.crashes == CFG.start_retries and c.forced_restarts == CFG.start_retries
    assert c.state is ChildState.STARTING
    ops.procs[-1].returncode = 1  # one more real crash is one too many
    assert isinstance(c.transition(now + 100)[-1], ChildFatal)
    assert c.state is ChildState.FATAL


def test_kill_still_counts_as_a_crash() -> None:
    c, _ = make(SupervisorConfig(backoff_initial_s=1, start_retries=0))
    c.start(0.0)
    c.kill("missed the reclaim deadline")  # misbehaving: not a forced restart
    assert isinstance(c.transition(1.0)[-1], ChildFatal) and c.forced_restarts == 0


def test_backoff_is_capped() -> None:
    c, ops = make(SupervisorConfig(backoff_initial_s=1, backoff_max_s=2, start_retries=10))
    c.start(0.0)
    for i in range(5):
        ops.procs[-1].returncode = 1
        c.transition(i * 10.0)
        assert c._backoff_until - i * 10.0 <= 2.0
        c.transition(i * 10.0 + 2.0)


def test_stable_run_resets_the_crash_count() -> None:
    c, ops = make()
    c.start(0.0)
    ops.procs[-1].returncode = 1
    c.transition(1.0)
    c.transition(3.0)
    c.on_ready(2, 4.0)
    assert c.crashes == 1
    c.transition(4.0 + CFG.stable_after_s)
    assert c.crashes == 0


def test_start_timeout_kills_and_backs_off() -> None:
    c, ops = make()
    c.start(0.0)
    assert c.transition(9.0) == []
    ev = c.transition(10.5)
    assert ops.signals == [(100, signal.SIGKILL)]
    assert ev == [ChildExited("decode", 1, -9, False)]
    assert c.state is ChildState.BACKOFF


def test_stop_ladder_stops_at_the_message_when_obeyed() -> None:
    ops = FakeOps()
    p = ops.spawn([], {})
    stop_ladder(p, ops, lambda: setattr(p, "returncode", 0), 0.01, 0.01)
    assert ops.signals == []


def test_stop_ladder_escalates_to_sigterm_then_sigkill() -> None:
    ops = FakeOps()
    p = ops.spawn([], {})
    p.on_signal[signal.SIGTERM] = None  # ignores SIGTERM
    rc = stop_ladder(p, ops, lambda: None, 0.01, 0.01)
    assert ops.signals == [(p.pid, signal.SIGTERM), (p.pid, signal.SIGKILL)]
    assert rc == -9


def test_child_stop_uses_the_ladder_and_ends_stopped() -> None:
    c, ops = make()
    c.start(0.0)
    c.on_ready(1, 0.5)
    asked = []
    c.stop(lambda: asked.append(1))
    assert asked == [1]
    assert ops.signals == [(100, signal.SIGTERM)]
    assert c.state is ChildState.STOPPED and c.proc is None


@pytest.mark.multiproc
def test_stop_ladder_on_real_processes() -> None:
    ops = PopenOps()
    obeys = ops.spawn([sys.executable, "-c", "import time; time.sleep(60)"], {})
    t0 = time.monotonic()
    assert stop_ladder(obeys, ops, None, 0.0, 5.0) == -signal.SIGTERM
    stubborn = ops.spawn([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                          "print('armed', flush=True); time.sleep(60)"], {})
    time.sleep(0.5)  # let it install the handler
    assert stop_ladder(stubborn, ops, None, 0.0, 0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 30


def test_describe_returncode() -> None:
    assert describe_returncode(-9) == "killed by SIGKILL"
    assert describe_returncode(3) == "exit code 3"


def test_before_signal_hook_runs_once_before_the_first_signal() -> None:
    ops = FakeOps()
    p = ops.spawn([], {})
    p.on_signal[signal.SIGTERM] = None  # ignores SIGTERM: the ladder goes on to SIGKILL
    seen: list[tuple[int, int]] = []
    stop_ladder(p, ops, lambda: None, 0.01, 0.01,
                before_signal=lambda pid: seen.append((pid, len(ops.signals))))
    assert seen == [(p.pid, 0)]  # before SIGTERM, not again before SIGKILL
    assert ops.signals == [(p.pid, signal.SIGTERM), (p.pid, signal.SIGKILL)]


def test_before_signal_hook_is_skipped_when_no_signal_is_needed() -> None:
    ops = FakeOps()
    p = ops.spawn([], {})
    seen: list[int] = []
    stop_ladder(p, ops, lambda: setattr(p, "returncode", 0), 0.01, 0.01,
                before_signal=seen.append)
    assert seen == [] and ops.signals == []


def test_child_runs_its_hook_before_kill_stop_and_start_timeout() -> None:
    seen: list[tuple[int, int]] = []
    c, ops = make(before_signal=lambda pid: seen.append((pid, len(ops.signals))))
    c.start(0.0)
    c.on_ready(1, 0.5)
    c.kill("test")
    assert seen == [(100, 0)] and ops.signals == [(100, signal.SIGKILL)]
    c.transition(1.0)
    c.transition(2.0)  # restarted after 1 s backoff, then never ready
    c.transition(20.0)
    assert seen[-1] == (101, 1) and ops.signals[-1] == (101, signal.SIGKILL)
    c.transition(30.0)
    c.on_ready(3, 30.0)
    c.stop(lambda: None)
    assert seen[-1] == (102, 2) and ops.signals[-1] == (102, signal.SIGTERM)


def test_a_failing_hook_never_keeps_the_signal_back() -> None:
    def broken(pid: int) -> None:
        raise RuntimeError("MPS control gone")

    c, ops = make(before_signal=broken)
    c.start(0.0)
    c.kill("test")
    assert ops.signals == [(100, signal.SIGKILL)]
