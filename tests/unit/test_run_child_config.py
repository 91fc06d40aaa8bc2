"""run_child: a configuration error is reported upstream and exits with EXIT_CONFIG, which the
supervisor treats as permanent; any other error exits 1 (a crash worth a restart)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from harli.runtime import EXIT_CONFIG, ConfigurationError, run_child


class _Loop:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.reported: list[BaseException] = []
        self.closed = False

    def request_stop(self, reason: str) -> None:
        pass

    def run(self) -> None:
        raise self.exc

    def report_fatal(self, exc: BaseException) -> None:
        self.reported.append(exc)

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    # run_child installs its own SIGTERM/SIGINT handlers; give pytest's back.
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize(("exc", "rc"), [(ConfigurationError("model.path: no such dir"),
                                           EXIT_CONFIG),
                                          (RuntimeError("boom"), 1)])
def test_exit_code_tells_configuration_from_crash(exc: BaseException, rc: int) -> None:
    loop = _Loop(exc)
    assert run_child("decode", loop) == rc
    assert loop.reported == [exc] and loop.closed
