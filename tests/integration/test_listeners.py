"""Local listeners: the TCP ports the daemon and its children listen on are the ones
docs/design.md ("Local listeners") lists, every one on loopback.

Read from /proc: each process's socket inodes (``/proc/<pid>/fd``) matched against the LISTEN
rows (state ``0A``) of ``/proc/<pid>/net/tcp`` and ``tcp6``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path

import pytest

from harli.bench.local_daemon import LocalDaemon
from harli.daemon.metrics import Metrics, is_loopback
from harli.decode_proc import engine as decode_engine

from .conftest import make_daemon

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

# vLLM 0.32, one worker, a dense model: the default torch.distributed group plus a device group
# and a CPU group for each of vLLM's world, tp, dcp, pcp, pp and dp coordinators, all gloo, one
# TCP listener each (docs/design.md, "Local listeners"). A vLLM that changes this changes the
# table there too.
DECODE_GLOO_LISTENERS = 13

_LISTEN = "0A"


def _hex_addr(field: str) -> tuple[str, int]:
    """``0100007F:1F90`` (tcp) or its 32-hex-digit tcp6 form -> ("127.0.0.1", 8080)."""
    host, port = field.split(":")
    raw = bytes.fromhex(host)
    # /proc prints each 32-bit word in host byte order (little-endian here).
    packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(packed)), int(port, 16)


def _listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    out = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for row in path.read_text().splitlines()[1:]:
            f = row.split()
            if f[3] == _LISTEN and f[9] in inodes:
                out.append(_hex_addr(f[1]))
    return sorted(out)


def _process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _non_loopback_interface() -> str | None:
    for name in sorted(os.listdir("/sys/class/net")):
        if name != decode_engine.loopback_interface():
            return name
    return None


def test_hex_addr() -> None:
    assert _hex_addr("0100007F:1F90") == ("127.0.0.1", 8080)
    assert _hex_addr("00000000:0050") == ("0.0.0.0", 80)
    assert _hex_addr("00000000000000000000000001000000:0050") == ("::1", 80)


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
    assert not is_loopback("192.0.2.2") and not is_loopback("metrics.example")


def test_metrics_warns_off_loopback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="harli.daemon.metrics"):
        Metrics().serve("127.0.0.1", _free_port())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with caplog.at_level(logging.WARNING, logger="harli.daemon.metrics"):
        Metrics().serve("0.0.0.0", _free_port())
    assert any("reachable beyond this host" in r.getMessage() for r in caplog.records)


def test_stale_rendezvous_stores_removed(tmp_path: Path) -> None:
    live = tmp_path / f"vllm-dist-{os.getpid()}.store"
    dead_pid = 2 ** 22 + 1  # above the default pid_max: never a live process
    dead = tmp_path / f"vllm-dist-{dead_pid}.store"
    other = tmp_path / "vllm-dist-notapid.store"
    for p in (live, dead, other):
        p.write_bytes(b"x")
    decode_engine._remove_stale_stores(tmp_path)
    assert live.exists() and other.exists() and not dead.exists()


def test_listeners_are_the_documented_ones(tmp_path: Path, tiny_model: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemon: the metrics port only, on 127.0.0.1 (its default address). Decode: vLLM's gloo
    groups only, on loopback even when GLOO_SOCKET_IFNAME names another interface (without the
    pin, gloo binds that interface's address, or the host name's). Finetune: none. Decode's
    rendezvous store is a file in the runtime dir, gone after shutdown."""
    other = _non_loopback_interface()
    if other is not None:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", other)
    port = _free_port()
    d: LocalDaemon = make_daemon(tmp_path, tiny_model, f"metrics.port={port}")
    run_dir = d.cfg.runtime_dir
    with d:
        d.wait_ready()
        assert d.proc is not None
        by_role: dict[str, list[tuple[str, int]]] = {}
        pids = {"daemon": d.proc.pid}
        for pid in d.children():
            name = _process_name(pid)
            role = name.split("::")[1].split("[")[0] if "::" in name else name
            pids[role] = pid
        for role, pid in pids.items():
            by_role[role] = _listeners(pid)
        assert set(pids) == {"daemon", "decode", "finetune"}, pids

        assert by_role["daemon"] == [("127.0.0.1", port)]
        assert by_role["finetune"] == []
        decode = by_role["decode"]
        assert len(decode) == DECODE_GLOO_LISTENERS, decode
        assert all(ipaddress.ip_address(a).is_loopback for a, _ in decode), decode
        assert port not in {p for _, p in decode}

        assert (run_dir / f"vllm-dist-{pids['decode']}.store").is_file()
    assert not list(run_dir.glob("vllm-dist-*.store"))
