"""``Inbox``: the finetune's input socket, read in this one place.

The daemon's messages reach the finetune at two kinds of points. Between a model's blocks,
inside a chunk, only the daemon's newest ``Decision`` may act (a level rise applies at once);
every other message (a lease grant or reclaim, a pause, a job to start or stop) has to wait
for a chunk boundary, where the lease is empty. So the inbox keeps the newest decision apart
from a queue of the other messages, in the order they came, and either point may drain the
socket into both without waiting on the other.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import zmq

from harli.ipc.codec import Decoder, drain
from harli.ipc.finetune import DaemonToFinetune, Decision


class Inbox:
    """The PULL socket ``finetune-in`` (the daemon binds it): the newest ``Decision`` by
    ``seq`` in ``decision``, every other message queued for ``take``."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self._sock = ctx.socket(zmq.PULL)
        self._sock.connect(endpoint)
        self._decoder: Decoder[DaemonToFinetune] = Decoder(DaemonToFinetune)
        self._queue: deque[DaemonToFinetune] = deque()
        self.decision = Decision(level=0, admitted=False, seq=0)  # none yet: paused

    def __len__(self) -> int:
        """Messages queued for ``take``."""
        return len(self._queue)

    def drain(self, timeout_ms: int = 0) -> None:
        """Read every message that has arrived, waiting up to ``timeout_ms`` for the first
        one only while nothing is queued (a queued message is work to do now)."""
        wait_ms = 0 if self._queue else timeout_ms
        for msg in drain(self._sock, self._decoder, wait_ms, "finetune"):
            if isinstance(msg, Decision):
                if msg.seq >= self.decision.seq:  # an older one overtaken in flight: stale
                    self.decision = msg
            else:
                self._queue.append(msg)

    def poll_latest_decision(self) -> Decision:
        """The newest decision, after reading what has arrived without waiting: what the
        training thread asks between a model's blocks."""
        self.drain(0)
        return self.decision

    def take(self) -> Iterator[DaemonToFinetune]:
        """The queued messages, oldest first, each removed as it is handed out (a message
        queued while they are handled comes out in this same pass)."""
        while self._queue:
            yield self._queue.popleft()

    def close(self) -> None:
        self._sock.close(linger=0)
