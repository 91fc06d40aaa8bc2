"""What every process role does to itself at start, shared by the daemon and its children: the
parent-death signal, CPU pinning (decode's cores) and scheduling class, the process title,
logging with the role's name, and ``run_child``, the loop-and-report-fatal frame of a child.

A child that fails on its configuration exits with ``EXIT_CONFIG``: restarting it cannot help,
so the supervisor makes it FATAL at once instead of spending its restart budget."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Protocol

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

# sysexits.h's EX_CONFIG; systemd also knows 78 as "configuration error".
EXIT_CONFIG = 78


class ConfigurationError(Exception):
    """A child cannot run with the configuration it was given (a missing model directory, a
    setting its engine refuses): permanent, so not worth a restart."""


DAEMON_PID_VAR = "HARLI_DAEMON_PID"  # set by the daemon in each child's environment


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits, so a child never
    outlives a daemon that was SIGKILLed (SGLang/vLLM do the same). Returns False when the
    daemon that started this process (``$HARLI_DAEMON_PID``) is already gone: it died before
    the signal was armed, nothing would end this process, and it would hold the daemon's arena
    (an inherited descriptor) for good, so the caller must exit."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    return os.environ.get(DAEMON_PID_VAR, str(os.getppid())) == str(os.getppid())


def decode_cores(cpu_cores: str, cpu_threads: int,
                 allowed: set[int] | None = None) -> set[int] | None:
    """The cores decode_proc is pinned to, or None for no pinning (see decode.cpu_cores)."""
    from harli.config import parse_cpu_list

    allowed = allowed if allowed is not None else os.sched_getaffinity(0)
    if cpu_cores == "none":
        return None
    if cpu_cores == "auto":
        if cpu_threads < 1 or len(allowed) <= cpu_threads:
            return None
        return set(sorted(allowed)[:cpu_threads])
    return parse_cpu_list(cpu_cores) & allowed or None


def format_cpu_list(cores: set[int] | None) -> str:
    return ",".join(str(c) for c in sorted(cores)) if cores else "none"


def pin_to(cores: set[int] | None, role: str) -> None:
    """Pin this process (and the threads it starts later) to ``cores``; None: leave as is.

    A process may widen its mask again within its cgroup's cpuset, so a child of a pinned
    daemon can still be pinned to the decode cores.
    """
    if cores:
        os.sched_setaffinity(0, cores)
        logger.info("[%s] pinned to cores %s", role, format_cpu_list(cores))


_SCHED_POLICIES = {"other": os.SCHED_OTHER, "batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}


def set_cpu_scheduling(policy: str, nice: int, role: str) -> None:
    """Every thread of this process, and those it starts later, to scheduling ``policy``
    ("other", "batch", "idle": systemd's CPUSchedulingPolicy= names) at ``nice``. Linux keeps
    both per thread and new threads inherit them from the one that starts them."""
    sched = _SCHED_POLICIES[policy]
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), sched, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except ProcessLookupError:  # a thread that just ended
            continue
    logger.info("[%s] cpu scheduling policy %s, nice %d", role, policy, nice)


class ChildLoop(Protocol):
    """What ``run_child`` needs of a child process's main object."""

    def request_stop(self, reason: str) -> None: ...

    def run(self) -> None: ...

    def report_fatal(self, exc: BaseException) -> None: ...

    def close(self) -> None: ...


def run_child(role: str, proc: ChildLoop) -> int:
    """Run a child's loop: signals become stop requests (handlers do no work), an unexpected
    error is reported upstream as the child's last words, resources are released; returns the
    exit code."""
    signal.signal(signal.SIGTERM, lambda *_: proc.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: proc.request_stop("SIGINT"))
    try:
        proc.run()
    except ConfigurationError as e:
        logger.error("[%s] configuration error: %s", role, e)
        proc.report_fatal(e)
        return EXIT_CONFIG
    except Exception as e:
        logger.exception("[%s] fatal error", role)
        proc.report_fatal(e)
        return 1
    finally:
        proc.close()
    return 0


def set_title(title: str) -> None:
    """Name this process in ps/top/systemctl status (``harli: decode`` and so on)."""
    import setproctitle

    setproctitle.setproctitle(title)


def configure_logging(role: str, level: str) -> None:
    """Log to stderr (journald captures it) with the role in every line."""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s harli::{role} %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
