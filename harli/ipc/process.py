"""Process-level helpers shared by every child role: parent-death signal, process title."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits, so a child never
    outlives a daemon that was SIGKILLed (SGLang/vLLM do the same)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())


def set_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # optional; only cosmetic in ps/top
        pass


def configure_logging(role: str, level: str) -> None:
    """Log to stderr (journald captures it) with the role in every line."""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s harli::{role} %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
