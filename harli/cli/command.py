"""The shape of a ``harli`` sub-command: arguments, validation, run (circus ``commands/``)."""

from __future__ import annotations

import argparse

from harli.client.inference import CurveKeys


class CommandError(Exception):
    """A user error in a command's arguments; printed without a traceback, exit code 2."""


class Command:
    name: str = ""
    help: str = ""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        pass

    def validate(self, args: argparse.Namespace) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="TOML", help="harli.toml (default: built-in)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")


def add_endpoint_arguments(p: argparse.ArgumentParser) -> None:
    """--config/--set, and how to reach the daemon: --endpoint and CURVE keys for tcp://."""
    add_config_arguments(p)
    p.add_argument("--endpoint", help="daemon endpoint (default: from the config)")
    p.add_argument("--server-key", metavar="FILE",
                   help="tcp:// only: the daemon's public CURVE certificate")
    p.add_argument("--client-key", metavar="FILE",
                   help="tcp:// only: this client's secret CURVE certificate")


def curve_kwargs(args: argparse.Namespace) -> CurveKeys:
    """The CURVE options, each loaded once here so that a missing or malformed certificate is a
    usage error naming its option, not a traceback from deep in the client."""
    import zmq.auth

    for option, path in (("--server-key", args.server_key), ("--client-key", args.client_key)):
        if path:
            try:
                zmq.auth.load_certificate(path)
            except (OSError, ValueError) as e:
                raise CommandError(f"{option} {path}: {e}") from None
    return {"server_key": args.server_key, "client_key": args.client_key}


def check_endpoint(ep: str) -> str:
    """``ep`` if it is an address a client can connect to (ipc://PATH or tcp://HOST:PORT)."""
    scheme, sep, rest = ep.partition("://")
    ok = bool(sep and rest) and (
        scheme == "ipc" or (scheme == "tcp" and rest.rpartition(":")[2].isdigit()))
    if not ok:
        raise CommandError(f"--endpoint {ep!r}: expected ipc://PATH or tcp://HOST:PORT")
    return ep


def load_config(args: argparse.Namespace, extra: list[str] | None = None):  # type: ignore[no-untyped-def]
    from harli.config import ConfigError, load

    try:
        return load(args.config, [*args.overrides, *(extra or [])])
    except ConfigError as e:
        raise CommandError(str(e)) from None


def resolve_endpoint(args: argparse.Namespace, kind: str) -> str:
    """The daemon's ``kind`` ("inference" or "control") endpoint: --endpoint, then the config's
    endpoint or runtime_dir (--config/--set), then ``harli.ipc.endpoints``' discovery (which
    also finds the system service's /run/harli). An ipc:// socket with no daemon behind it
    raises ``DaemonNotRunning`` at once, rather than after a request's timeout."""
    from harli.ipc import endpoints

    if args.endpoint:
        ep = check_endpoint(str(args.endpoint))
    else:
        cfg = load_config(args)
        if getattr(cfg.endpoints, kind) or cfg.daemon.runtime_dir:
            ep = str(getattr(cfg, f"{kind}_endpoint"))
        else:
            ep = endpoints.default_endpoint(f"{kind}.sock")
    endpoints.check_listening(ep)
    return ep


def control_client(args: argparse.Namespace, timeout_s: float = 120.0):  # type: ignore[no-untyped-def]
    """A ``ControlClient`` to the daemon named by --endpoint / --config / CURVE options."""
    from harli.client.control import ControlClient

    return ControlClient(resolve_endpoint(args, "control"), timeout_s=timeout_s,
                         **curve_kwargs(args))
