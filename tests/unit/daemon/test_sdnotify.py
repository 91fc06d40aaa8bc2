"""sd_notify: READY/STATUS/STOPPING datagrams reach $NOTIFY_SOCKET; without it, nothing."""

from __future__ import annotations

import socket
from pathlib import Path

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


def test_no_socket_is_a_no_op_and_a_dead_socket_only_warns(tmp_path: Path) -> None:
    Notifier(None).ready("x")
    Notifier(str(tmp_path / "missing")).ready("x")  # logs a warning, never raises
