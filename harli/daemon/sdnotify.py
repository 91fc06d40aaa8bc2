"""systemd's readiness protocol (sd_notify(3)): one datagram to ``$NOTIFY_SOCKET``; and its
watchdog (sd_watchdog_enabled(3)): ``WATCHDOG=1`` at half of ``$WATCHDOG_USEC``.

Optional: without ``NOTIFY_SOCKET`` (not under ``Type=notify``) every call is a no-op, and
without ``WATCHDOG_USEC`` (no ``WatchdogSec=``) the watchdog never sends.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None) -> None:
        self._address = address
        if address and address.startswith("@"):  # abstract namespace
            self._address = "\0" + address[1:]

    def notify(self, state: str) -> None:
        if not self._address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(self._address)
                s.sendall(state.encode())
        except OSError as e:
            logger.warning("[systemd] sd_notify(%r) failed: %s", state, e)

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """The watchdog interval systemd expects pings within, or None: sd_watchdog_enabled's
    rules (``WATCHDOG_USEC`` a positive integer; ``WATCHDOG_PID``, when set, names us)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = environ.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != pid:
                return None  # meant for another process (e.g. our parent)
        except ValueError:
            return None
    return usec / 1e6


class Watchdog:
    """Sends ``WATCHDOG=1`` at most every half interval, from the daemon's loop.

    The daemon calls ``kick`` once per loop turn with whether it is healthy; a loop that
    stops turning (a handler stuck, a deadlock) or reports itself unhealthy stops the pings,
    and systemd kills and restarts the service once the interval passes.
    """

    def __init__(self, notifier: Notifier, interval_s: float | None) -> None:
        self._notifier = notifier
        self.interval_s = interval_s
        self._last = float("-inf")

    @classmethod
    def from_environ(cls, notifier: Notifier) -> Watchdog:
        return cls(notifier, watchdog_interval_s(os.environ, os.getpid()))

    def kick(self, now: float, healthy: bool) -> bool:
        """Ping if due and healthy; returns whether a ping was sent."""
        if self.interval_s is None or not healthy or now - self._last < self.interval_s / 2:
            return False
        self._last = now
        self._notifier.notify("WATCHDOG=1")
        return True
