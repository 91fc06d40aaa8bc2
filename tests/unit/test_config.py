"""Config: TOML and overrides into frozen dataclasses; every bad key or value is named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harli.config import (
    ConfigError,
    Env,
    HarliConfig,
    child_environ,
    from_json,
    load,
    parse_override,
)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_derived_endpoints(tmp_path: Path) -> None:
    cfg = load(None, [f'daemon.runtime_dir="{tmp_path}"'])
    assert cfg.inference_endpoint == f"ipc://{tmp_path}/inference.sock"
    assert cfg.internal_endpoint("decode-in") == f"ipc://{tmp_path}/decode-in.sock"
    assert cfg.model_path.parent == cfg.state_dir / "models"
    assert cfg.model_path.name.startswith("tiny-0-")


def test_documented_example_config_loads() -> None:
    cfg = load(REPO / "deploy" / "harli.toml")
    assert isinstance(cfg, HarliConfig)


def test_overrides_parse_toml_values() -> None:
    assert parse_override("decode.max_num_seqs=8") == ("decode", "max_num_seqs", 8)
    assert parse_override("model.path=/a/b") == ("model", "path", "/a/b")
    assert parse_override('model.dtype="bfloat16"') == ("model", "dtype", "bfloat16")
    assert parse_override("decode.enforce_eager=false") == ("decode", "enforce_eager", False)


def test_json_round_trip_for_children() -> None:
    cfg = load(None, ["decode.max_num_seqs=3", "model.path=/m",
                      'finetune.extra_output_roots=["/srv/a", "/srv/b"]'])
    assert from_json(cfg.to_json()) == cfg


def test_job_outputs_go_under_the_state_dir_unless_configured() -> None:
    cfg = load(None, ['daemon.state_dir="/var/lib/harli"'])
    assert cfg.output_roots == [Path("/var/lib/harli/jobs")]
    cfg = load(None, ['finetune.output_root="/srv/jobs"', 'finetune.extra_output_roots=["/x"]'])
    assert cfg.output_roots == [Path("/srv/jobs"), Path("/x")]


@pytest.mark.parametrize(("override", "named"), [
    ("decode.max_num_seqs=0", "decode.max_num_seqs"),
    ('decode.max_num_seqs="8"', "decode.max_num_seqs"),
    ("decode.kv_cache_gib=0", "decode.kv_cache_gib"),
    ("decode.bogus=1", "decode.bogus"),
    ("bogus.key=1", "[bogus]"),
    ('model.dtype="int3"', "model.dtype"),
    ('daemon.log_level="LOUD"', "daemon.log_level"),
    ('endpoints.inference="http://x"', "endpoints.inference"),
    ("endpoints.max_message_bytes=10", "endpoints.max_message_bytes"),
    ("supervisor.start_retries=-1", "supervisor.start_retries"),
    ("supervisor.backoff_initial_s=0", "supervisor.backoff_initial_s"),
    ("decode.enforce_eager=1", "decode.enforce_eager"),
    ("nodot=1", "section.key=value"),
    ('finetune.cpu_scheduling_policy="fifo"', "finetune.cpu_scheduling_policy"),
    ("finetune.nice=20", "finetune.nice"),
    ("finetune.omp_spin_count=-1", "finetune.omp_spin_count"),
    ("scheduler.budget_tokens=0", "scheduler.budget_tokens"),
    ("scheduler.budget_max_factor=0.5", "scheduler.budget_max_factor"),
    ("scheduler.budget_max_factor=inf", "scheduler.budget_max_factor"),
    ("scheduler.infeasible_slowdown=0.9", "scheduler.infeasible_slowdown"),
    ("scheduler.infeasible_slowdown=inf", "scheduler.infeasible_slowdown"),
    ('scheduler.policy="harli:loose"', "scheduler.policy"),
    ('finetune.output_root="jobs"', "finetune.output_root"),
    ('finetune.extra_output_roots=["rel"]', "finetune.extra_output_roots"),
    ('finetune.extra_output_roots="/srv"', "finetune.extra_output_roots"),
    ("finetune.extra_output_roots=[1]", "finetune.extra_output_roots"),
])
def test_bad_values_name_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load(None, [override])


def test_the_finetune_spins_briefly_at_openmp_barriers_and_decode_never_does() -> None:
    cfg = load(None)
    finetune, decode = child_environ(cfg, "finetune"), child_environ(cfg, "decode")
    assert finetune["GOMP_SPINCOUNT"] == str(cfg.finetune.omp_spin_count) != "0"
    assert "OMP_WAIT_POLICY" not in finetune
    assert decode["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in decode
    passive = child_environ(load(None, ["finetune.omp_spin_count=0"]), "finetune")
    assert passive["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in passive


def test_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[decode\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[decode]\nmax_num_seq = 4\n")
    with pytest.raises(ConfigError, match=r"typo.toml: unknown key decode.max_num_seq"):
        load(typo)


def test_config_is_frozen() -> None:
    cfg = load(None)
    with pytest.raises(AttributeError):
        cfg.decode.max_num_seqs = 2  # type: ignore[misc]


def test_runtime_dir_defaults_follow_systemd_then_xdg() -> None:
    e = Env(runtime_directory="/run/harli", state_directory="/var/lib/harli",
            xdg_runtime_dir="/run/user/1", notify_socket=None, uid=1)
    assert e.default_runtime_dir() == "/run/harli"
    assert e.default_state_dir() == "/var/lib/harli"
    e = Env(runtime_directory=None, state_directory=None, xdg_runtime_dir="/run/user/1",
            notify_socket=None, uid=1)
    assert e.default_runtime_dir() == "/run/user/1/harli"
    e = Env(runtime_directory=None, state_directory=None, xdg_runtime_dir=None,
            notify_socket=None, uid=7)
    assert e.default_runtime_dir() == "/tmp/harli-7"


def test_tcp_endpoint_requires_a_curve_key() -> None:
    with pytest.raises(ConfigError, match=r"endpoints\.curve_server_key"):
        load(None, ['endpoints.inference="tcp://127.0.0.1:5555"'])
    cfg = load(None, ['endpoints.inference="tcp://127.0.0.1:5555"',
                      'endpoints.curve_server_key="/etc/harli/server.key_secret"', "http.port=0"])
    assert cfg.inference_endpoint == "tcp://127.0.0.1:5555"


def test_arena_smaller_than_the_kv_cache_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"memory\.arena_gib"):
        load(None, ["memory.arena_gib=0.5", "decode.kv_cache_gib=1"])
    cfg = load(None, ["decode.kv_cache_gib=2"])
    assert cfg.arena_bytes == 2 << 30


@pytest.mark.parametrize(("spec", "text"), [("fastest", "accepted forms"),
                                            ("static:9", r"0\.\.4"), ("static:x", "integer")])
def test_a_bad_scheduler_policy_is_a_config_error_naming_it(spec: str, text: str) -> None:
    with pytest.raises(ConfigError, match=rf"scheduler\.policy: .*{text}"):
        load(None, [f'scheduler.policy="{spec}"'])


def test_children_do_not_inherit_the_service_notify_and_watchdog(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in (("NOTIFY_SOCKET", "/run/systemd/notify"), ("WATCHDOG_USEC", "60000000"),
                       ("WATCHDOG_PID", "1234")):
        monkeypatch.setenv(var, value)
    for role in ("decode", "finetune"):
        env = child_environ(load(None), role)
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(env)


@pytest.mark.parametrize(("override", "message"), [
    ("lora.max_lora_rank=12", "lora.max_lora_rank: expected one of 1, 8, 16, 32, 64, 128, 256, "
                              "320, 512 (the ranks vLLM can be built for), got 12"),
    ("lora.max_loras=0", "lora.max_loras: expected >= 1, got 0"),
    ("lora.max_cpu_loras=2", "lora.max_cpu_loras: expected >= lora.max_loras (4), got 2"),
    ("lora.rank=8", "lora.rank"),
])
def test_lora_settings_are_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(None, [override])
    cfg = load(None, ["lora.max_lora_rank=64", "lora.max_cpu_loras=4"])
    assert (cfg.lora.enabled, cfg.lora.max_lora_rank, cfg.lora.max_loras) == (True, 64, 4)
