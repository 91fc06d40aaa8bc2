"""The OS behind ``MpsControl``: one ``MpsOps`` object runs the MPS control binary and reads its
files, so that ``daemon/mps.py`` is tested against a fake that records command lines and stdin
text, and ``SubprocessOps`` is the real one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class CommandResult:
    returncode: int | None  # None: it ran past its timeout and was killed
    output: str  # stdout and stderr together


class MpsOps(Protocol):
    """Everything ``MpsControl`` asks of the OS."""

    def run(self, argv: Sequence[str], env: Mapping[str, str], stdin_text: str | None,
            timeout_s: float) -> CommandResult:
        """Run to completion; raise ``FileNotFoundError`` when ``argv[0]`` does not exist."""
        ...

    def which(self, name: str, search_path: str) -> str | None: ...

    def make_private_dir(self, path: Path) -> None: ...

    def read_from(self, path: Path, offset: int, max_bytes: int) -> tuple[str, int]:
        """Text from ``offset`` (from 0 if the file shrank), and the offset after it; ``("",
        0)`` for a missing file."""
        ...

    def file_size(self, path: Path) -> int: ...

    def pid_alive(self, pid: int) -> bool: ...

    def sleep(self, seconds: float) -> None: ...


class SubprocessOps:
    """The real OS. Output goes to a temporary file, not a pipe: ``-d`` forks a daemon that may
    keep the inherited stdout open, and reading a pipe to EOF would then wait for it to exit."""

    def run(self, argv: Sequence[str], env: Mapping[str, str], stdin_text: str | None,
            timeout_s: float) -> CommandResult:
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.run(list(argv), env=dict(env), input=(stdin_text or "").encode(),
                                      stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s,
                                      check=False)
                rc: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
            out.seek(0)
            return CommandResult(rc, out.read().decode(errors="replace"))

    def which(self, name: str, search_path: str) -> str | None:
        return shutil.which(name, path=search_path)

    def make_private_dir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.chmod(0o700)  # mkdir's mode is masked by the umask and ignored for an existing dir

    def read_from(self, path: Path, offset: int, max_bytes: int) -> tuple[str, int]:
        try:
            with path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = offset if 0 <= offset <= size else 0
                start = max(start, size - max_bytes)
                f.seek(start)
                return f.read().decode(errors="replace"), size
        except FileNotFoundError:
            return "", 0

    def file_size(self, path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def pid_alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by someone else
        return True

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
