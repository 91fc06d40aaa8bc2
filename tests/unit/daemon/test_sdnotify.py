"""sd_notify: READY/STATUS/STOPPING datagrams reach $NOTIFY_SOCKET; without it, nothing. The
watchdog pings at half of $WATCHDOG_USEC, only while healthy."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from harli.daemon.sdnotify import Notifier, Watchdog, watchdog_interval_s


def test_datagrams_reach_the_notify_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(5)
        n = Notifier(path)
        n.ready("serving m")
        assert server.recv(1024) == b"READY=1\nSTATUS=serving m"
        n.stopping()
        assert server.recv(1024) == b"STOPPING=1"


def test_no_socket_is_a_no_op_and_a_dead_socket_only_warns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="harli.daemon.sdnotify"):
        Notifier(None).ready("x")
        assert not caplog.records  # not under systemd: nothing to say
        Notifier(str(tmp_path / "missing")).ready("x")  # never raises
    assert len(caplog.records) == 1 and "sd_notify('READY=1\\nSTATUS=x') failed" in caplog.text


def test_watchdog_interval_follows_sd_watchdog_enabled() -> None:
    assert watchdog_interval_s({}, 10) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000"}, 10) == 2.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "10"}, 10) == 2.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "11"}, 10) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, 10) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, 10) is None


def test_watchdog_pings_at_half_the_interval_only_while_healthy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(0.2)
        w = Watchdog.from_environ(Notifier(path))
        assert w.interval_s == 2.0
        assert w.kick(100.0, healthy=True)
        assert server.recv(64) == b"WATCHDOG=1"
        assert not w.kick(100.5, healthy=True)  # within half the interval
        assert w.kick(101.0, healthy=True)
        assert server.recv(64) == b"WATCHDOG=1"
        assert not w.kick(105.0, healthy=False)  # unhealthy: silence, systemd restarts us
        with pytest.raises(TimeoutError):
            server.recv(64)
        assert w.kick(106.0, healthy=True)
        assert server.recv(64) == b"WATCHDOG=1"


def test_no_watchdog_usec_never_pings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    w = Watchdog.from_environ(Notifier(str(tmp_path / "missing")))
    assert not w.kick(0.0, healthy=True)
