"""Where clients and the daemon look for the local daemon's sockets, and the at-once check."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from harli.ipc import endpoints
from harli.ipc.endpoints import DaemonNotRunning


def test_daemon_runtime_dir_order() -> None:
    full = {"HARLI_RUNTIME_DIR": "/h", "RUNTIME_DIRECTORY": "/run/harli:/run/other",
            "XDG_RUNTIME_DIR": "/run/user/7"}
    assert endpoints.daemon_runtime_dir(full, uid=7) == "/h"
    del full["HARLI_RUNTIME_DIR"]
    assert endpoints.daemon_runtime_dir(full, uid=7) == "/run/harli"  # systemd's first dir
    del full["RUNTIME_DIRECTORY"]
    assert endpoints.daemon_runtime_dir(full, uid=7) == "/run/user/7/harli"
    assert endpoints.daemon_runtime_dir({}, uid=7) == "/tmp/harli-7"


def test_client_falls_back_to_the_system_service_only_when_its_own_dir_has_no_socket(
        tmp_path: Path) -> None:
    mine, system = tmp_path / "user", tmp_path / "system"
    mine.mkdir()
    system.mkdir()
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "xdg")}
    own = str(tmp_path / "xdg" / "harli")
    # Neither has a socket: the client's own dir, so the error names where a user daemon goes.
    assert endpoints.client_runtime_dir("control.sock", env, system_dir=str(system)) == own
    (system / "control.sock").touch()
    assert endpoints.client_runtime_dir("control.sock", env, system_dir=str(system)) == \
        str(system)
    (tmp_path / "xdg" / "harli").mkdir(parents=True)
    (tmp_path / "xdg" / "harli" / "control.sock").touch()
    assert endpoints.client_runtime_dir("control.sock", env, system_dir=str(system)) == own
    # An explicit directory is never second-guessed.
    explicit = {"HARLI_RUNTIME_DIR": str(mine)}
    assert endpoints.client_runtime_dir("control.sock", explicit, system_dir=str(system)) == \
        str(mine)


def test_default_endpoints_are_ipc_sockets_in_the_runtime_dir() -> None:
    env = {"HARLI_RUNTIME_DIR": "/h"}
    assert endpoints.default_inference_endpoint(env) == "ipc:///h/inference.sock"
    assert endpoints.default_control_endpoint(env) == "ipc:///h/control.sock"


def test_state_dir_order() -> None:
    assert endpoints.default_state_dir({"STATE_DIRECTORY": "/var/lib/harli:/x",
                                        "XDG_STATE_HOME": "/s"}) == "/var/lib/harli"
    assert endpoints.default_state_dir({"XDG_STATE_HOME": "/s"}) == "/s/harli"
    assert endpoints.default_state_dir({}).endswith("/.local/state/harli")


def test_a_missing_socket_is_known_at_once(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with pytest.raises(DaemonNotRunning, match=f"no socket at {path}"):
        endpoints.check_listening(f"ipc://{path}")


def test_a_stale_socket_file_is_known_at_once(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, as after kill -9; nobody listens
    with pytest.raises(DaemonNotRunning, match="stale socket"):
        endpoints.check_listening(f"ipc://{path}")


def test_a_listening_socket_and_tcp_endpoints_pass(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    try:
        endpoints.check_listening(f"ipc://{path}")
    finally:
        s.close()
    endpoints.check_listening("tcp://127.0.0.1:1")  # not probed: its request's timeout covers it
