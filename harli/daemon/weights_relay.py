"""``WeightsRelay``: the daemon's side of sharing decode's weights with the finetune (CUDA hosts,
``gpu.share_weights``).

Decode exports its model's weights once per engine start (``WeightsExported``, sent before its
``Ready``); the daemon keeps the latest and relays it to the finetune. This class decides:

- **when to relay**: at once when the finetune is ready, else on its ``FinetuneReady``; each
  finetune incarnation gets the weights once, before any ``StartJob`` (same socket, so in
  order);
- **when a job may start** (``may_start_job``): only once the finetune holds the weights of the
  decode now running, so that the job builds its model on them instead of loading a second
  copy into the memory decode needs. An empty export (decode could not export) opens the gate
  too: the job then loads its own copy;
- **what a decode exit means** (``on_decode_exit``): the finetune's model is views of the dead
  process's memory, which must not be used (and a restarted decode needs it back). The
  smallest correct rule: a finetune running a job on them is restarted, and its job resumes
  from its last checkpoint, because the job manager requeues the running job of a finetune
  that exits (the crash path, as for an MPS fault). An idle finetune holds no views (a job's
  model is released when the job ends) and needs nothing: the gate stays closed until the new
  decode's weights have reached it.

Pure logic: no sockets, no CUDA; the daemon passes events in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from harli.ipc.weights import WeightsExported

logger = logging.getLogger(__name__)


class WeightsRelay:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled  # gpu.share_weights on a CUDA host, with a finetune process
        self.latest: WeightsExported | None = None  # of the decode incarnation now running
        self._sent_to: int | None = None  # the finetune incarnation that has ``latest``

    def on_exported(self, msg: WeightsExported, decode_incarnation: int) -> bool:
        """Keep decode's export (``generation`` is its incarnation); False when ignored."""
        if not self.enabled:
            logger.warning("[weights] decode[%d] exported its weights but sharing is off here; "
                           "ignored", msg.generation)
            return False
        if msg.generation != decode_incarnation:
            logger.info("[weights] ignoring the export of decode[%d] (decode[%d] runs now)",
                        msg.generation, decode_incarnation)
            return False
        self.latest = msg
        self._sent_to = None
        if msg.exports:
            logger.info("[weights] decode[%d] exported %d weights in %d allocations",
                        msg.generation, len(msg.exports), len({e.handle for e in msg.exports}))
        else:
            logger.warning("[weights] decode[%d] exported no weights; finetune jobs load their "
                           "own copy", msg.generation)
        return True

    def relay(self, finetune_incarnation: int, send: Callable[[WeightsExported], bool]) -> bool:
        """Send the latest export to this finetune incarnation unless it has it already."""
        if self.latest is None or self._sent_to == finetune_incarnation:
            return False
        if not send(self.latest):
            return False
        self._sent_to = finetune_incarnation
        return True

    def may_start_job(self, finetune_incarnation: int, decode_device: str | None) -> bool:
        """Whether the job manager may hand the finetune a job now. ``decode_device`` is the
        device of decode's last ``Ready`` (None before the first): a decode that turned out not
        to run on CUDA exports nothing, so it holds no job back."""
        if not self.enabled:
            return True
        if decode_device is not None and not decode_device.startswith("cuda"):
            return True
        return self.latest is not None and self._sent_to == finetune_incarnation

    def on_decode_exit(self, finetune_incarnation: int | None, job_running: bool) -> str | None:
        """Forget the dead decode's weights. Returns why the finetune must be restarted (it runs
        a job on them), or None."""
        held = (self.latest is not None and bool(self.latest.exports)
                and self._sent_to is not None and self._sent_to == finetune_incarnation)
        generation = self.latest.generation if self.latest is not None else None
        self.latest = None
        self._sent_to = None
        if held and job_running:
            return (f"decode[{generation}] exited and the running job's base model is views of "
                    f"its weights; the finetune restarts and the job resumes from its last "
                    f"checkpoint")
        return None
