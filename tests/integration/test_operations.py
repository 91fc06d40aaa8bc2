"""Process-level operations of the real daemon: one daemon per dirs, socket modes."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from .conftest import make_daemon


def test_second_daemon_on_same_dirs_exits_and_first_still_serves(tmp_path: Path,
                                                                  tiny_model: Path) -> None:
    first = make_daemon(tmp_path, tiny_model)
    with first:
        assert first.proc is not None
        argv = [sys.executable, "-m", "harli.cli.main", "daemon"]
        for o in first.overrides:
            argv += ["--set", o]
        second = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        out = second.stdout + second.stderr
        assert second.returncode != 0, out
        assert f"already running (pid {first.proc.pid})" in out, out
        assert "Traceback" not in out, out
        # The first daemon's sockets are still there and it still answers.
        run_dir = first.cfg.runtime_dir
        assert any(run_dir.iterdir())
        with first.client(timeout_s=60.0) as c:
            assert c.hello().ready
            done = c.complete([5, 6, 7, 8], max_tokens=4, temperature=0.0, ignore_eos=True)
            assert len(done.token_ids) == 4


def test_public_ipc_sockets_are_group_writable(tmp_path: Path, tiny_model: Path) -> None:
    d = make_daemon(tmp_path, tiny_model)
    with d:
        for ep in (d.cfg.inference_endpoint, d.cfg.control_endpoint):
            assert ep.startswith("ipc://")
            mode = stat.S_IMODE(Path(ep[len("ipc://"):]).stat().st_mode)
            assert mode == 0o660, oct(mode)
