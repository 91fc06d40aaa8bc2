"""``LocalDaemon``: start a real ``harli daemon`` process on this host and wait until it serves.

Used by the demo, the benchmarks and the integration tests, so they all exercise the same
daemon a systemd unit would run (a separate process, its own runtime and state dirs).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from harli.client.inference import CurveKeys, InferenceClient, RequestError
from harli.config import HarliConfig, load

logger = logging.getLogger(__name__)


class LocalDaemon:
    def __init__(self, base_dir: Path, overrides: list[str] | None = None,
                 log_file: Path | None = None, config_file: Path | None = None,
                 client_key: str | None = None) -> None:
        """``client_key``: the secret CURVE certificate our clients present on a tcp://
        endpoint whose daemon authorizes client keys."""
        self.base_dir = Path(base_dir)
        self.overrides = [
            f'daemon.runtime_dir="{self.base_dir / "run"}"',
            f'daemon.state_dir="{self.base_dir / "state"}"',
            "metrics.port=0",  # several local daemons may run at once; a test opts in
            "http.port=0",
            *(overrides or []),
        ]
        self.config_file = config_file
        self.cfg: HarliConfig = load(config_file, self.overrides)
        self.log_path = log_file or self.base_dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[Any] | None = None
        # A secret certificate holds the public key too, so the daemon's own file serves as
        # the server key of local clients.
        tcp = self.endpoint.startswith("tcp://")
        self.curve: CurveKeys = {
            "server_key": self.cfg.endpoints.curve_server_key if tcp else None,
            "client_key": client_key if tcp else None}

    @property
    def endpoint(self) -> str:
        return self.cfg.inference_endpoint

    def start(self) -> LocalDaemon:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        argv = [sys.executable, "-m", "harli.cli.main", "daemon"]
        if self.config_file:
            argv += ["--config", str(self.config_file)]
        for o in self.overrides:
            argv += ["--set", o]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        """Block until the daemon answers Hello with ready=True."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}; log: "
                                   f"{self.log_path}\n{self.log_tail()}")
            try:
                with InferenceClient(self.endpoint, timeout_s=2.0, **self.curve) as c:
                    if c.hello().ready:
                        return
            except RequestError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"daemon not ready after {timeout_s:.0f} s; log: {self.log_path}\n"
                           f"{self.log_tail()}")

    def client(self, **kw: Any) -> InferenceClient:
        return InferenceClient(self.endpoint, **{**self.curve, **kw})

    def children(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM and wait (SIGKILL if it does not exit); returns the exit code."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.error("daemon ignored SIGTERM for %.0f s; killing it", timeout_s)
                self.proc.kill()
                rc = self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def __enter__(self) -> LocalDaemon:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
