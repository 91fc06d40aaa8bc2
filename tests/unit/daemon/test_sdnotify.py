"""sd_notify: READY/STATUS/STOPPING datagrams reach $NOTIFY_SOCKET; without it, nothing."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from harli.daemon.sdnotify import Notifier


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
