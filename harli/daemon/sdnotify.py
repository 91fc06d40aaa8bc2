"""systemd's readiness protocol (sd_notify(3)): one datagram to ``$NOTIFY_SOCKET``.

Optional: without ``NOTIFY_SOCKET`` (not under ``Type=notify``) every call is a no-op.
"""

from __future__ import annotations

import logging
import socket

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
