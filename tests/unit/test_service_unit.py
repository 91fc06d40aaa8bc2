"""deploy/harli.service: what systemd reads from it, and ``systemd-analyze verify`` on it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "harli.service"


def _sections() -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key, []).append(value)
    return out


def test_start_limits_are_where_systemd_reads_them() -> None:
    s = _sections()
    assert {"StartLimitIntervalSec", "StartLimitBurst"} <= set(s["Unit"])
    assert not {"StartLimitIntervalSec", "StartLimitBurst"} & set(s["Service"])


def test_notify_watchdog_and_no_retry_of_a_setup_error() -> None:
    svc = _sections()["Service"]
    assert svc["Type"] == ["notify"]
    assert int(svc["WatchdogSec"][0]) > 0
    assert "2" in svc["RestartPreventExitStatus"][0].split()
    assert svc["RuntimeDirectory"] == ["harli"] and svc["StateDirectory"] == ["harli"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # The shipped unit runs /opt/harli's install; point it at this checkout's so that verify
    # checks everything else.
    harli = Path(sys.executable).with_name("harli")
    unit = tmp_path / "harli.service"
    unit.write_text(UNIT.read_text().replace("/opt/harli/.venv/bin/harli", str(harli)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert not r.stderr.strip(), r.stderr
