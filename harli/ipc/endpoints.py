"""Where the local daemon's sockets are: one pure, environment-reading discovery shared by the
daemon (``harli.config.Env``), the CLI and the Python clients, so that their defaults agree.

The daemon's runtime directory, first that is set:

1. ``$HARLI_RUNTIME_DIR`` (an operator's override, also honoured by every client);
2. ``$RUNTIME_DIRECTORY`` (systemd ``RuntimeDirectory=harli``: ``/run/harli`` for the service);
3. ``$XDG_RUNTIME_DIR/harli`` (a per-user daemon in a login session);
4. ``/tmp/harli-$UID``.

A client looks in the same place, except that when the per-user choice (3 or 4) has no socket
and the system service's ``/run/harli`` has one, it uses ``/run/harli``: an operator's shell has
no ``$RUNTIME_DIRECTORY``, yet ``harli status`` must find the service without flags.

The state directory: ``$STATE_DIRECTORY`` (systemd), then ``$XDG_STATE_HOME/harli``, then
``~/.local/state/harli``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

SYSTEM_RUNTIME_DIR = "/run/harli"
RUNTIME_DIR_VAR = "HARLI_RUNTIME_DIR"
INFERENCE_SOCKET = "inference.sock"
CONTROL_SOCKET = "control.sock"


def first_dir(environ: Mapping[str, str], var: str) -> str | None:
    # systemd passes a colon-separated list when several directories are configured.
    v = environ.get(var)
    return v.split(":")[0] if v else None


def daemon_runtime_dir(environ: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """The runtime directory a daemon uses when its config names none."""
    env = os.environ if environ is None else environ
    explicit = env.get(RUNTIME_DIR_VAR) or first_dir(env, "RUNTIME_DIRECTORY")
    if explicit:
        return explicit
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "harli")
    return f"/tmp/harli-{os.getuid() if uid is None else uid}"


def client_runtime_dir(socket_name: str = CONTROL_SOCKET,
                       environ: Mapping[str, str] | None = None, uid: int | None = None,
                       system_dir: str = SYSTEM_RUNTIME_DIR) -> str:
    """The runtime directory a client looks in for ``socket_name`` (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get(RUNTIME_DIR_VAR) or first_dir(env, "RUNTIME_DIRECTORY"):
        return daemon_runtime_dir(env, uid)
    mine = daemon_runtime_dir(env, uid)
    if not os.path.exists(os.path.join(mine, socket_name)) and \
            os.path.exists(os.path.join(system_dir, socket_name)):
        return system_dir
    return mine


def default_endpoint(socket_name: str, environ: Mapping[str, str] | None = None) -> str:
    """``ipc://`` address of the local daemon's ``socket_name`` as a client finds it."""
    return f"ipc://{os.path.join(client_runtime_dir(socket_name, environ), socket_name)}"


def default_inference_endpoint(environ: Mapping[str, str] | None = None) -> str:
    return default_endpoint(INFERENCE_SOCKET, environ)


def default_control_endpoint(environ: Mapping[str, str] | None = None) -> str:
    return default_endpoint(CONTROL_SOCKET, environ)


def default_state_dir(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    state = first_dir(env, "STATE_DIRECTORY")
    if state:
        return state
    if env.get("XDG_STATE_HOME"):
        return os.path.join(env["XDG_STATE_HOME"], "harli")
    return os.path.expanduser("~/.local/state/harli")


# Modes of the daemon's Unix socket files, set right after each bind (a bound socket file takes
# the umask's mode). Connecting to a Unix socket needs write permission on it.
PUBLIC_SOCKET_MODE = 0o660  # inference, control: the service's group may connect
INTERNAL_SOCKET_MODE = 0o600  # daemon <-> child channels: the daemon's user only


def set_socket_mode(endpoint: str, mode: int) -> None:
    """Give an ``ipc://`` endpoint's socket file ``mode``; nothing for any other transport."""
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint[len("ipc://"):], mode)


class DaemonNotRunning(Exception):
    """An ipc:// endpoint has no listening daemon behind it; known at once, without waiting."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"harli daemon is not running ({reason} at {path})")
        self.path = path
        self.reason = reason


def check_listening(endpoint: str) -> None:
    """Raise ``DaemonNotRunning`` if ``endpoint`` is ipc:// and nothing listens on its socket.

    A tcp:// endpoint is not probed (a remote daemon may be slow to accept); the request's
    own timeout covers it.
    """
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://"):]
    if not os.path.exists(path):
        raise DaemonNotRunning(path, "no socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        raise DaemonNotRunning(path, "a stale socket with no listener") from None
    except OSError:
        return  # e.g. no permission to connect: let the request say what goes wrong
    finally:
        probe.close()
