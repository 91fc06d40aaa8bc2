"""Entry of ``harli daemon``: the supervising daemon as a foreground process fit for systemd
(``Type=notify``). It sets up logging and the process title, builds the ``Daemon``, turns
SIGTERM and SIGINT into stop requests and runs the loop; a setup the daemon cannot start with
(model directory, arena, latency profile, MPS) exits with status 2 and a message that names
it. One daemon per runtime and state dir: a second one on the same dirs exits with status 1
naming the first's pid, before it touches anything.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import harli
from harli.arena.shm import ArenaError
from harli.config import ConfigError, HarliConfig
from harli.daemon.daemon import Daemon
from harli.daemon.mps import MpsError
from harli.daemon.pidlock import AlreadyRunning, PidLock
from harli.model.check import ModelDirError, check_model_dir
from harli.predictor import ProfileError
from harli.runtime import configure_logging, set_title

logger = logging.getLogger(__name__)


def run_daemon(cfg: HarliConfig) -> int:
    """Entry of ``harli daemon``: a foreground process fit for systemd."""
    configure_logging("daemon", cfg.daemon.log_level)
    set_title("harli::daemon")
    try:
        # The dirs themselves are made here: the lock files live in them.
        cfg.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = PidLock([cfg.runtime_dir, cfg.state_dir])
    except AlreadyRunning as e:
        logger.error("[daemon] cannot start: %s", e)
        return 1
    except OSError as e:
        logger.error("[daemon] cannot start: runtime or state dir: %s", e)
        return 2
    try:
        return _run(cfg)
    finally:
        lock.release()


def _run(cfg: HarliConfig) -> int:
    try:
        if cfg.model.path:  # unset: the daemon generates the tiny model itself
            check_model_dir(Path(cfg.model.path))
    except ModelDirError as e:
        logger.error("[daemon] cannot start: %s", e)
        return 2
    try:
        daemon = Daemon(cfg)
    except (ArenaError, ProfileError, ConfigError) as e:
        logger.error("[daemon] cannot start: %s", e)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop("SIGINT"))
    logger.info("[daemon] harli %s pid %d, state dir %s", harli.__version__, os.getpid(),
                cfg.state_dir)
    try:
        return daemon.run()
    except MpsError as e:
        logger.error("[daemon] cannot start: %s", e)
        return 2
