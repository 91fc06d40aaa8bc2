"""The ``harli`` console script's contract with a user: help for every option, exit codes, and
no traceback for a user's mistake, a missing or silent daemon, a closed pipe or Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from harli.cli.main import (
    EXIT_INTERRUPTED,
    EXIT_NOT_RUNNING,
    EXIT_REFUSED,
    build_parser,
)

ROOT = Path(__file__).resolve().parents[3]


def _harli(*argv: str, runtime_dir: Path,
           stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HARLI_RUNTIME_DIR": str(runtime_dir)}
    return subprocess.run([sys.executable, "-m", "harli.cli.main", *argv], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, timeout=60,
                          check=False)


def _walk(p: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sp in a.choices.items():
                assert helps.get(name), f"{path} {name} has no help"
                yield from _walk(sp, f"{path} {name}")
        elif not isinstance(a, argparse._HelpAction | argparse._VersionAction):
            yield path, a


def test_every_command_and_option_has_help_text() -> None:
    missing = [f"{path} {a.option_strings or a.dest}" for path, a in _walk(build_parser(),
               "harli") if not a.help]
    assert not missing


def test_every_help_page_renders() -> None:
    # argparse %-formats help strings: a bare "%" in one only fails when --help is asked for.
    def pages(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    yield from pages(sp)

    for page in pages(build_parser()):
        assert page.format_help()


def test_generate_defaults_are_the_protocol_defaults() -> None:
    from harli.ipc.inference import Generate

    args = build_parser().parse_args(["generate", "x"])
    g = Generate(request_id="r")
    assert (args.max_tokens, args.temperature, args.top_p) == \
        (g.max_tokens, g.temperature, g.top_p)


def test_version_and_bare_harli(tmp_path: Path) -> None:
    v = _harli("--version", runtime_dir=tmp_path)
    assert v.returncode == 0
    assert v.stdout.startswith("harli ")
    bare = _harli(runtime_dir=tmp_path)
    assert bare.returncode == 0
    assert "usage: harli" in bare.stdout
    assert "generate" in bare.stdout


@pytest.mark.parametrize("argv", [["jobs"], ["status"], ["generate", "hi"], ["level", "1"],
                                  ["job", "show", "1"], ["attach", "data.jsonl"]])
def test_no_daemon_fails_at_once_with_its_own_exit_code(tmp_path: Path,
                                                        argv: list[str]) -> None:
    t0 = time.monotonic()
    r = _harli(*argv, runtime_dir=tmp_path)
    elapsed_s = time.monotonic() - t0
    assert r.returncode == EXIT_NOT_RUNNING, r.stderr
    assert f"harli daemon is not running (no socket at {tmp_path}/" in r.stderr
    assert "Traceback" not in r.stderr
    # Loose on purpose (a shared 2-core host): the point is "not a 120 s request timeout".
    assert elapsed_s < 30


@pytest.mark.parametrize("argv", [["generate", "hi", "--endpoint", "foo"],
                                  ["status", "--endpoint", "tcp://127.0.0.1:1",
                                   "--server-key", "/nonexistent"],
                                  ["generate", "hi", "--max-tokens", "0"],
                                  ["generate", "hi", "--set", "nope.key=1"],
                                  ["level", "one"]])
def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path, argv: list[str]) -> None:
    r = _harli(*argv, runtime_dir=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip()


@pytest.fixture
def silent_daemon(tmp_path: Path) -> Iterator[zmq.Socket]:  # type: ignore[type-arg]
    """A ROUTER on the inference socket that reads requests and never answers."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"ipc://{tmp_path}/inference.sock")
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def test_a_daemon_that_does_not_answer_is_a_timeout_message(
        tmp_path: Path, silent_daemon: zmq.Socket) -> None:  # type: ignore[type-arg]
    r = _harli("generate", "hi", "--timeout", "1", runtime_dir=tmp_path)
    assert r.returncode == EXIT_REFUSED
    assert "timeout: no reply" in r.stderr
    assert "Traceback" not in r.stderr


def _default_sigint() -> None:
    # A test runner started in the background inherits SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler; a user's terminal has the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_without_a_traceback(tmp_path: Path,
                                              silent_daemon: zmq.Socket) -> None:  # type: ignore[type-arg]
    env = {**os.environ, "HARLI_RUNTIME_DIR": str(tmp_path)}
    p = subprocess.Popen([sys.executable, "-m", "harli.cli.main", "generate", "hi",
                          "--timeout", "60"], stderr=subprocess.PIPE, text=True, env=env,
                         cwd=ROOT, preexec_fn=_default_sigint)
    try:
        assert silent_daemon.poll(30_000), "the request never arrived"
        silent_daemon.recv_multipart()  # it is now waiting for a reply
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == EXIT_INTERRUPTED
    assert "Traceback" not in err
