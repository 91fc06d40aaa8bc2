"""The quota policy in the real daemon: the highest level while decode is idle, decode-only
when no level's predicted bound fits the SLO, switched at run time from the control API, SLO
attainment counted from the engine's token times."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from harli.tools.client import RequestError
from harli.tools.control_client import ControlClient

from .conftest import make_daemon

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]


def _wait_level(c: ControlClient, level: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while c.status().level != level:
        assert time.monotonic() < deadline, f"level never became {level}: {c.status()}"
        time.sleep(0.05)


def test_harli_policy_follows_the_load_and_switches_live(tmp_path: Path,
                                                         tiny_model: Path) -> None:
    # An SLO no iteration can meet: under load the harli policy must pause the finetune.
    with make_daemon(tmp_path / "d", tiny_model, 'scheduler.policy="harli"',
                     "scheduler.tpot_slo_ms=0.5") as d, \
            ControlClient(d.cfg.control_endpoint) as c:
        _wait_level(c, 4)  # idle decode: the highest level
        levels: list[int] = []
        done = threading.Event()

        def watch() -> None:
            with ControlClient(d.cfg.control_endpoint) as w:
                while not done.is_set():
                    levels.append(w.status().level)
                    time.sleep(0.02)

        th = threading.Thread(target=watch)
        th.start()
        with d.client(timeout_s=120) as cl:
            for i in range(3):
                out = cl.complete([5 + i, 6, 7], max_tokens=120, ignore_eos=True)
                assert len(out.token_ids) == 120
        done.set()
        th.join()
        assert 0 in levels  # paused while decoding
        _wait_level(c, 4)  # and back to the highest once idle
        sc = c.status().scheduler
        assert sc is not None and sc.policy == "harli"
        assert sc.tokens >= 3 * 119 and sc.requests == 3
        assert sc.per_token is not None and sc.per_token < 0.5  # 0.5 ms is never met
        assert sc.decision_p99_us is not None and sc.level_changes >= 2

        assert c.set_policy("static:3").level == 3
        assert c.set_policy("decode-only").level == 0
        with pytest.raises(RequestError, match="accepted forms"):
            c.set_policy("fastest")
        assert c.status().scheduler.policy == "decode-only"  # type: ignore[union-attr]
        c.set_policy("harli")
        _wait_level(c, 4)
