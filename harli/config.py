"""Harli's configuration: one TOML file loaded into frozen dataclasses, validated here.

This is the only module that reads the environment (systemd's ``RUNTIME_DIRECTORY`` /
``STATE_DIRECTORY`` / ``NOTIFY_SOCKET``, ``XDG_RUNTIME_DIR``); every other module receives a
``HarliConfig``. An unknown section or key, or a value of the wrong type or range, raises
``ConfigError`` naming it (``decode.max_num_seqs: expected an integer >= 1, got 0``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import msgspec

from harli.ipc import endpoints as ipc_endpoints


class ConfigError(ValueError):
    """A configuration key or value that is wrong; the message names it."""


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class DaemonConfig:
    runtime_dir: str = _help(
        "Sockets and other per-boot files. Default: $RUNTIME_DIRECTORY (systemd), else "
        "$XDG_RUNTIME_DIR/harli, else /tmp/harli-$UID.", default="")
    state_dir: str = _help(
        "Persistent state (generated model, job store). Default: $STATE_DIRECTORY (systemd), "
        "else ~/.local/state/harli.", default="")
    log_level: str = _help("DEBUG, INFO, WARNING or ERROR.", default="INFO")
    drain_timeout_s: float = _help(
        "On SIGTERM, how long in-flight requests may run to completion before they are "
        "aborted with finish_reason 'shutdown'.", default=10.0)
    tick_s: float = _help("Upper bound on how long the daemon loop blocks when idle.",
                          default=0.05)

    def __post_init__(self) -> None:
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"daemon.log_level: expected DEBUG, INFO, WARNING or ERROR, "
                              f"got {self.log_level!r}")
        _positive("daemon.drain_timeout_s", self.drain_timeout_s, allow_zero=True)
        _positive("daemon.tick_s", self.tick_s)


@dataclass(frozen=True)
class EndpointsConfig:
    inference: str = _help(
        "Where inference clients connect. Default ipc://<runtime_dir>/inference.sock; "
        "tcp://HOST:PORT only when set here.", default="")
    control: str = _help(
        "Where harli attach/jobs connect. Default ipc://<runtime_dir>/control.sock.",
        default="")
    curve_server_key: str = _help(
        "The daemon's secret CURVE certificate (harli keys DIR writes one); required when an "
        "endpoint is tcp://, which is then encrypted.", default="")
    curve_authorized_keys: str = _help(
        "Directory of client public certificates allowed on tcp:// endpoints; empty: any "
        "client that has the daemon's public certificate.", default="")
    max_message_bytes: int = _help(
        "Largest client message served; a larger one (up to 4x this) gets a 'too_large' "
        "error reply, and beyond that ZMQ_MAXMSGSIZE drops the connection.",
        default=1 << 20)

    def __post_init__(self) -> None:
        for key in ("inference", "control"):
            value = getattr(self, key)
            if value and not value.startswith(("ipc://", "tcp://")):
                raise ConfigError(f"endpoints.{key}: expected an ipc:// or tcp:// address, "
                                  f"got {value!r}")
        if any(v.startswith("tcp://") for v in (self.inference, self.control)) \
                and not self.curve_server_key:
            raise ConfigError("endpoints.curve_server_key: required when an endpoint is "
                              "tcp:// (make a key pair with `harli keys DIR`)")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"endpoints.max_message_bytes: expected >= 1024, "
                              f"got {self.max_message_bytes}")


@dataclass(frozen=True)
class ModelConfig:
    path: str = _help(
        "A Hugging Face model directory served by vLLM. Empty: the generated tiny model "
        "under <state_dir>/models/tiny-<seed>-<spec digest>, created on first use.",
        default="")
    tiny_seed: int = _help("Seed of the generated tiny model when path is empty.", default=0)
    dtype: str = _help("auto, float32, bfloat16 or float16.", default="auto")
    max_model_len: int = _help("Longest prompt + output, in tokens; 0 = the model's own.",
                               default=2048)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype: expected auto, float32, bfloat16 or float16, "
                              f"got {self.dtype!r}")
        if self.max_model_len < 0:
            raise ConfigError(f"model.max_model_len: expected >= 0, got {self.max_model_len}")


@dataclass(frozen=True)
class DecodeConfig:
    max_num_seqs: int = _help("vLLM max_num_seqs: most requests in one decode batch.",
                              default=64)
    max_num_batched_tokens: int = _help("vLLM max_num_batched_tokens; 0 = vLLM's default.",
                                        default=0)
    kv_cache_gib: int = _help("KV cache size on CPU hosts (VLLM_CPU_KVCACHE_SPACE), whole GiB.",
                              default=1)
    gpu_memory_utilization: float = _help("vLLM gpu_memory_utilization on GPU hosts.",
                                          default=0.5)
    enforce_eager: bool = _help("Disable CUDA graphs / compilation (vLLM enforce_eager).",
                                default=True)
    telemetry_hwm: int = _help("Telemetry records buffered per subscriber before drops.",
                               default=10000)
    cpu_threads: int = _help(
        "CPU hosts: OpenMP threads of the decode engine (OMP_NUM_THREADS); 0 leaves it to "
        "torch. vLLM-cpu in-process cannot lower torch's thread count after start, and spare "
        "OpenMP threads spin on the cores the daemon, clients and finetune need.", default=1)
    cpu_cores: str = _help(
        "Cores the decode process is pinned to: 'auto' (the first cpu_threads cores, when the "
        "host has more), 'none', or a list like '0-1,4'. The daemon pins itself to the other "
        "cores, so that routing tokens never preempts the engine step.", default="auto")

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"decode.max_num_seqs: expected >= 1, got {self.max_num_seqs}")
        if self.cpu_cores not in ("auto", "none"):
            try:
                parse_cpu_list(self.cpu_cores)
            except ValueError as e:
                raise ConfigError(f"decode.cpu_cores: {e}") from None
        if self.cpu_threads < 0:
            raise ConfigError(f"decode.cpu_threads: expected >= 0, got {self.cpu_threads}")
        if self.max_num_batched_tokens < 0:
            raise ConfigError("decode.max_num_batched_tokens: expected >= 0, "
                              f"got {self.max_num_batched_tokens}")
        if self.kv_cache_gib < 1:
            raise ConfigError(f"decode.kv_cache_gib: expected >= 1, got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("decode.gpu_memory_utilization: expected in (0, 1], "
                              f"got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class FinetuneConfig:
    enabled: bool = _help("Run the finetune process (LoRA jobs attached with harli attach).",
                          default=True)
    levels: int = _help("Compute quota levels 1..levels (0 = paused).", default=4)
    level: int = _help(
        "The quota level the finetune starts at, until the scheduler policy's first decision "
        "(for a fixed level use scheduler.policy = \"static:L\"); 0 = paused.", default=2)
    max_threads: int = _help("CPU hosts: threads at the top level; 0 = all cores.", default=0)
    chunk_tokens: int = _help(
        "A micro-batch runs forward and backward in chunks of at most this many padded tokens "
        "per thread of its quota level on CPU hosts (the gradient is the same). Between "
        "chunks the finetune reads the daemon's messages, so a pause (level 0) or a lease "
        "reclaim takes effect within a chunk rather than at the end of the micro-step; 0 = "
        "one chunk.", default=256)
    cpu_scheduling_policy: str = _help(
        "Linux scheduling policy of every finetune thread, as systemd's CPUSchedulingPolicy= "
        "names them: \"idle\" (runs only on CPU time nothing else wants, so the daemon, "
        "decode and clients preempt it at once), \"batch\" or \"other\" (the default "
        "class).", default="idle")
    nice: int = _help("Nice value of every finetune thread (0..19; \"other\" and \"batch\" "
                      "only: \"idle\" is below every nice value).", default=0)
    omp_spin_count: int = _help(
        "CPU hosts: how long (libgomp's GOMP_SPINCOUNT, busy-wait iterations) an idle OpenMP "
        "thread of the finetune spins at a barrier before it sleeps. A short spin lets the "
        "top levels' threads meet at the next op without a futex wake-up; 0 sleeps at once "
        "(OMP_WAIT_POLICY=PASSIVE), which leaves two threads slower than one on small ops.",
        default=20000)
    max_dataset_bytes: int = _help(
        "Largest dataset file a job may attach, in bytes; a larger one is refused at attach.",
        default=1 << 30)
    max_line_bytes: int = _help(
        "Longest line (one record) of a dataset file, in bytes.", default=4 << 20)
    max_dataset_records: int = _help("Most records a dataset file may hold.",
                                     default=1_000_000)
    output_root: str = _help(
        "Every job's output_dir lies under this directory (a job that names none gets "
        "OUTPUT_ROOT/NAME), so a job spec cannot make the daemon write elsewhere. "
        "Default: STATE_DIR/jobs.", default="")
    extra_output_roots: tuple[str, ...] = _help(
        "Other directories a job's output_dir may lie under, e.g. [\"/srv/adapters\"]; any "
        "other output_dir is refused at attach.", default=())

    def __post_init__(self) -> None:
        for key, roots in (("output_root", (self.output_root,)),
                           ("extra_output_roots", self.extra_output_roots)):
            for root in roots:
                if root and not root.startswith("/"):
                    raise ConfigError(f"finetune.{key}: expected an absolute path, got {root!r}")
        for key in ("max_dataset_bytes", "max_line_bytes", "max_dataset_records"):
            if getattr(self, key) < 1:
                raise ConfigError(f"finetune.{key}: expected >= 1, got {getattr(self, key)}")
        if self.cpu_scheduling_policy not in ("idle", "batch", "other"):
            raise ConfigError(f"finetune.cpu_scheduling_policy: expected \"idle\", \"batch\" "
                              f"or \"other\", got {self.cpu_scheduling_policy!r}")
        if self.chunk_tokens < 0:
            raise ConfigError(f"finetune.chunk_tokens: expected >= 0, got {self.chunk_tokens}")
        if not 0 <= self.nice <= 19:
            raise ConfigError(f"finetune.nice: expected 0..19, got {self.nice}")
        if self.levels < 1:
            raise ConfigError(f"finetune.levels: expected >= 1, got {self.levels}")
        if not 0 <= self.level <= self.levels:
            raise ConfigError(f"finetune.level: expected 0..{self.levels} (finetune.levels), "
                              f"got {self.level}")
        if self.max_threads < 0:
            raise ConfigError(f"finetune.max_threads: expected >= 0, got {self.max_threads}")
        if self.omp_spin_count < 0:
            raise ConfigError("finetune.omp_spin_count: expected >= 0, "
                              f"got {self.omp_spin_count}")


@dataclass(frozen=True)
class SupervisorConfig:
    start_timeout_s: float = _help("A child that is not READY after this is killed.",
                                   default=300.0)
    stop_grace_s: float = _help("After the Shutdown message, wait this long, then SIGTERM.",
                                default=5.0)
    term_timeout_s: float = _help("After SIGTERM, wait this long, then SIGKILL.", default=5.0)
    backoff_initial_s: float = _help("First restart delay after a crash.", default=0.5)
    backoff_max_s: float = _help("Restart delay cap (doubles per consecutive crash).",
                                 default=30.0)
    start_retries: int = _help("Consecutive crashes before a child is FATAL.", default=5)
    stable_after_s: float = _help("A child RUNNING this long resets the crash count.",
                                  default=60.0)

    def __post_init__(self) -> None:
        for name in ("start_timeout_s", "backoff_initial_s", "backoff_max_s"):
            _positive(f"supervisor.{name}", getattr(self, name))
        for name in ("stop_grace_s", "term_timeout_s", "stable_after_s"):
            _positive(f"supervisor.{name}", getattr(self, name), allow_zero=True)
        if self.start_retries < 0:
            raise ConfigError(f"supervisor.start_retries: expected >= 0, "
                              f"got {self.start_retries}")


@dataclass(frozen=True)
class MemoryConfig:
    arena: bool = _help(
        "Put vLLM's KV cache in the shared arena (CPU hosts: a /dev/shm file the daemon "
        "creates); false keeps vLLM's private allocation.", default=True)
    arena_gib: float = _help("Arena size in GiB; 0 = exactly the KV cache "
                             "(decode.kv_cache_gib).", default=0.0)
    page_bytes: int = _help("Arena page size, the unit lent to the finetune.",
                            default=2 << 20)
    lend: bool = _help("Lend free KV pages to the finetune for its activations (needs the "
                       "arena and a finetune process).", default=True)
    floor_blocks: int = _help(
        "KV blocks always kept free for decode, whatever the predicted demand; also vLLM's "
        "admission watermark while lending, so that new requests cannot take it from running "
        "ones while a reclaim is in flight.", default=64)
    horizon_iters: int = _help(
        "Decode iterations ahead the KV demand is predicted over when deciding what to lend "
        "(each running request may need a new block within it).", default=256)
    reclaim_deadline_factor: float = _help(
        "Deadline for the finetune to give pages back, as a multiple of its recent micro-step "
        "time; missing it gets the finetune stopped and restarted from its checkpoint.",
        default=2.0)
    reclaim_deadline_min_s: float = _help(
        "Lower bound of the reclaim deadline (before a micro-step time is known, and for "
        "very short micro-steps).", default=1.0)

    def __post_init__(self) -> None:
        if self.floor_blocks < 0:
            raise ConfigError(f"memory.floor_blocks: expected >= 0, got {self.floor_blocks}")
        if self.horizon_iters < 0:
            raise ConfigError(f"memory.horizon_iters: expected >= 0, got {self.horizon_iters}")
        if self.reclaim_deadline_factor < 1.0:
            raise ConfigError(f"memory.reclaim_deadline_factor: expected >= 1, got "
                              f"{self.reclaim_deadline_factor}")
        if self.reclaim_deadline_min_s <= 0:
            raise ConfigError(f"memory.reclaim_deadline_min_s: expected > 0, got "
                              f"{self.reclaim_deadline_min_s}")
        if self.arena_gib < 0:
            raise ConfigError(f"memory.arena_gib: expected >= 0, got {self.arena_gib}")
        if self.page_bytes < 4096 or self.page_bytes % 4096:
            raise ConfigError(f"memory.page_bytes: expected a multiple of 4096, "
                              f"got {self.page_bytes}")


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = _help(
        "Who sets the finetune's quota level: harli (before every decode iteration, the "
        "largest level whose predicted latency bound stays under the TPOT SLO, the bound at "
        "the quantile the error budget allows), harli:strict (the bound always at the "
        "attainment quantile), harli:max (a level allowed only with every level below it, "
        "the rule before the isotonic fit of the bounds), static:L, naive (always the "
        "highest), decode-only (finetune paused). Switchable at run time: "
        "`harli policy SPEC`.", default="harli")
    tpot_slo_ms: float = _help("Decode TPOT SLO: the time between two tokens of a request.",
                               default=50.0)
    attainment: float = _help("Share of tokens (and of requests) that must meet the SLO.",
                              default=0.99)
    budget_tokens: int = _help(
        "harli's error budget: the window, in measured tokens (an exponential decay), over "
        "which the share of tokens that missed the SLO is counted.", default=1000)
    budget_max_factor: float = _help(
        "harli's error budget: a decision may take up to this many times the target miss "
        "share (1 - attainment) as its own miss probability, once the window's misses are "
        "down to 1/this of the target; 1x on target; none once 1/this over it.", default=10.0)
    level_by_rate: bool = _help(
        "harli, while decode is busy: run at the level (up to the feasible one) whose "
        "micro-steps have trained fastest beside a busy decode, measured per job; false: "
        "always the feasible level itself.", default=True)
    infeasible_slowdown: float = _help(
        "harli, when even decode alone is predicted over the SLO (a pause cannot bring the "
        "iteration inside it): keep the highest level whose fitted slowdown of decode, and "
        "every lower level's, is at most this factor, while the error budget has misses to "
        "spare (harli pauses once it is behind its target); 1 = pause.", default=1.1)

    def __post_init__(self) -> None:
        if not self.tpot_slo_ms > 0:
            raise ConfigError(f"scheduler.tpot_slo_ms: expected > 0, got {self.tpot_slo_ms}")
        if not 0 < self.attainment <= 1:
            raise ConfigError(f"scheduler.attainment: expected in (0, 1], got "
                              f"{self.attainment}")
        if self.budget_tokens < 1:
            raise ConfigError(f"scheduler.budget_tokens: expected >= 1, got "
                              f"{self.budget_tokens}")
        if not 1.0 <= self.budget_max_factor < math.inf:
            raise ConfigError(f"scheduler.budget_max_factor: expected a finite number >= 1, "
                              f"got {self.budget_max_factor}")
        if not 1.0 <= self.infeasible_slowdown < math.inf:
            raise ConfigError(f"scheduler.infeasible_slowdown: expected a finite number >= 1 "
                              f"(1 = pause), got {self.infeasible_slowdown}")


# The LoRA ranks vLLM can be built for (its LoRAConfig.max_lora_rank).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = _help(
        "Serve LoRA adapters: decode builds vLLM with LoRA (enable_lora), and a request may "
        "name an adapter (a finished job's, or one added with `harli adapter add`) as its "
        "model. Off: only the base model is served.", default=True)
    max_loras: int = _help("Distinct adapters in one decode batch (vLLM max_loras).",
                           default=4)
    max_lora_rank: int = _help(
        f"Highest adapter rank served (vLLM max_lora_rank, one of "
        f"{', '.join(map(str, VLLM_LORA_RANKS))}); a job or adapter of a higher rank is "
        f"refused.", default=16)
    max_cpu_loras: int = _help(
        "Adapters kept loaded in host memory (vLLM max_cpu_loras, >= max_loras): more are "
        "loaded again from disk when asked for.", default=8)

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ConfigError(f"lora.max_loras: expected >= 1, got {self.max_loras}")
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ConfigError(f"lora.max_lora_rank: expected one of "
                              f"{', '.join(map(str, VLLM_LORA_RANKS))} (the ranks vLLM can be "
                              f"built for), got {self.max_lora_rank}")
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"lora.max_cpu_loras: expected >= lora.max_loras "
                              f"({self.max_loras}), got {self.max_cpu_loras}")


@dataclass(frozen=True)
class PredictorConfig:
    profile: str = _help(
        "Latency profile from `harli profile --out FILE`; one measured on another model, "
        "backend, dtype, host or harli version is refused at start. Empty: start from "
        "prior_iteration_ms and learn online from telemetry.", default="")
    prior_iteration_ms: float = _help(
        "Conservative decode iteration time assumed until the online fit has data (no "
        "profile).", default=50.0)

    def __post_init__(self) -> None:
        if self.prior_iteration_ms <= 0:
            raise ConfigError(f"predictor.prior_iteration_ms: expected > 0, got "
                              f"{self.prior_iteration_ms}")


@dataclass(frozen=True)
class MetricsConfig:
    port: int = _help("Prometheus endpoint port; 0 turns it off.", default=9464)
    addr: str = _help(
        "Address it listens on. Default 127.0.0.1 (loopback): the page is plain HTTP without "
        "authentication and names job ids, token counts and losses, so only local processes "
        "should read it; any other address logs a warning at start. Scrape it remotely "
        "through a proxy or firewall that you control.", default="127.0.0.1")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"metrics.port: expected 0..65535, got {self.port}")


@dataclass(frozen=True)
class HttpConfig:
    port: int = _help(
        "Port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /v1/fine_tuning/jobs, ...); 0 turns it off.", default=8000)
    host: str = _help(
        "Address it listens on. Default 127.0.0.1 (loopback). Any other address needs "
        "api_keys_file: an API open beyond this host would let anyone generate and train.",
        default="127.0.0.1")
    api_keys_file: str = _help(
        "File of API keys, one per line (blank lines and # comments ignored). When set, the "
        "API needs `Authorization: Bearer KEY`, as `vllm serve --api-key` does (the probes "
        "stay open: see open_probes); files and fine-tuning jobs belong to the key that made "
        "them.", default="")
    open_probes: bool = _help(
        "With api_keys_file: /health, /ping, /version, /load and /metrics answer without a "
        "key, as vllm serve's do (a router's health checks and scrapes send none); /metrics "
        "then leaves out the series that name fine-tuning jobs unless a key is sent. False: "
        "they need a key too.", default=True)
    max_body_bytes: int = _help("Largest request body; a larger one gets 413.",
                                default=32 << 20)
    max_n: int = _help("Most choices one request may ask for (`n`).", default=16)
    max_concurrent_requests: int = _help(
        "Generation requests in flight over HTTP at once; more get 429 until some finish.",
        default=1024)
    header_timeout_s: float = _help(
        "A connection that has not sent a complete request head (request line and headers) "
        "within this long is closed: from when it opened, or on a keep-alive connection from "
        "the first byte of its next request. Bounds slow-header (slowloris) clients; 0 turns "
        "it off.", default=10.0)
    max_header_bytes: int = _help(
        "Largest request head (request line and headers); a larger one gets 431 and the "
        "connection is closed.", default=65536)
    keep_alive_timeout_s: int = _help(
        "An idle keep-alive connection is closed after this long without a new request "
        "(uvicorn's timeout_keep_alive). A proxy in front should close idle connections to "
        "us sooner than this.", default=5)
    max_connections: int = _help(
        "Open connections at most. One more closes the connection that has waited longest "
        "for a request head (idle keep-alive, or a head not complete yet); when every "
        "connection is in a request, the new one gets 503. The front raises its open-files "
        "limit to fit.", default=2048)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"http.port: expected 0..65535, got {self.port}")
        if not self.host:
            raise ConfigError("http.host: expected an address, got ''")
        if self.port and not _loopback(self.host) and not self.api_keys_file:
            raise ConfigError(f"http.host: {self.host} is reachable beyond this host; set "
                              f"http.api_keys_file (API keys, one per line) or bind 127.0.0.1")
        if not 0 <= self.header_timeout_s < math.inf:  # NaN fails too
            raise ConfigError(f"http.header_timeout_s: expected seconds >= 0 (0: off), got "
                              f"{self.header_timeout_s}")
        for key in ("max_body_bytes", "max_n", "max_concurrent_requests",
                    "max_header_bytes", "keep_alive_timeout_s", "max_connections"):
            if getattr(self, key) < 1:
                raise ConfigError(f"http.{key}: expected >= 1, got {getattr(self, key)}")


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass(frozen=True)
class GpuConfig:
    """GPU hosts only; a CPU host (vllm-cpu, no NVIDIA driver) ignores this section."""

    mps: str = _help(
        "NVIDIA MPS for the two children: off (each child has its own CUDA context; the GPU "
        "time-slices between them), start (the daemon starts a private control daemon with "
        "its pipe and log directories under <runtime_dir>/mps and quits it at shutdown), or "
        "attach (use an MPS control daemon someone else runs, at mps_pipe_dir; never quit "
        "by us).", default="off")
    mps_pipe_dir: str = _help(
        "attach only: the running control daemon's CUDA_MPS_PIPE_DIRECTORY (an absolute "
        "path; the daemon and both children must use the same one).", default="")
    quota: str = _help(
        "How the finetune's compute share is capped: green_context (several green contexts "
        "with different SM counts, switched at micro-step boundaries; the finetune's MPS "
        "active thread percentage stays at 100) or mps_percentage (fallback: the finetune "
        "runs at fallback_active_thread_pct for its whole life; the quota level only pauses "
        "and admits micro-steps). mps_percentage needs mps = start or attach.",
        default="green_context")
    fallback_active_thread_pct: int = _help(
        "quota = mps_percentage: the finetune's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, 1..100; "
        "decode always runs at 100.", default=50)
    share_weights: bool = _help(
        "The finetune builds its base model on views of decode's weights (exported by CUDA "
        "IPC) instead of loading a second copy; a job then starts only once decode has "
        "exported them, and when decode exits a job running on them is restarted from its "
        "checkpoint. false: the finetune loads the model from disk onto the GPU.",
        default=True)

    def __post_init__(self) -> None:
        if self.mps not in ("off", "start", "attach"):
            raise ConfigError(f"gpu.mps: expected off, start or attach, got {self.mps!r}")
        if self.mps == "attach":
            if not self.mps_pipe_dir:
                raise ConfigError("gpu.mps_pipe_dir: required when gpu.mps = \"attach\" (the "
                                  "CUDA_MPS_PIPE_DIRECTORY of the running control daemon)")
            if not os.path.isabs(self.mps_pipe_dir):
                raise ConfigError(f"gpu.mps_pipe_dir: expected an absolute path, got "
                                  f"{self.mps_pipe_dir!r}")
        elif self.mps_pipe_dir:
            raise ConfigError(f"gpu.mps_pipe_dir: only used with gpu.mps = \"attach\" (gpu.mps "
                              f"= {self.mps!r}; \"start\" makes its own under the runtime "
                              "dir); remove it")
        if self.quota not in ("green_context", "mps_percentage"):
            raise ConfigError(f"gpu.quota: expected green_context or mps_percentage, got "
                              f"{self.quota!r}")
        if self.quota == "mps_percentage" and self.mps == "off":
            raise ConfigError("gpu.quota: mps_percentage needs gpu.mps = \"start\" or "
                              "\"attach\" (the percentage is an MPS client setting)")
        if not 1 <= self.fallback_active_thread_pct <= 100:
            raise ConfigError(f"gpu.fallback_active_thread_pct: expected 1..100, got "
                              f"{self.fallback_active_thread_pct}")


@dataclass(frozen=True)
class HarliConfig:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    endpoints: EndpointsConfig = field(default_factory=EndpointsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)

    def __post_init__(self) -> None:
        from harli.scheduler.policy import check_policy

        try:  # here, where finetune.levels is known
            check_policy(self.scheduler.policy, self.finetune.levels)
        except ValueError as e:
            raise ConfigError(f"scheduler.policy: {e}") from None
        if self.http.port and any(ep.startswith("tcp://") for ep in (self.endpoints.inference,
                                                                      self.endpoints.control)):
            raise ConfigError("http.port: the HTTP API reaches the daemon over its ipc:// "
                              "endpoints; with a tcp:// endpoint set http.port = 0")
        if self.memory.arena_gib and self.memory.arena_gib < self.decode.kv_cache_gib:
            raise ConfigError(f"memory.arena_gib: {self.memory.arena_gib} GiB is smaller than "
                              f"the KV cache vLLM needs (decode.kv_cache_gib = "
                              f"{self.decode.kv_cache_gib})")

    @property
    def arena_bytes(self) -> int:
        gib = self.memory.arena_gib or self.decode.kv_cache_gib
        page = self.memory.page_bytes
        return -(-int(gib * 2**30) // page) * page

    # -- derived paths (defaults resolved from the environment read in Env) --------------------

    @property
    def runtime_dir(self) -> Path:
        return Path(self.daemon.runtime_dir or ENV.default_runtime_dir())

    @property
    def state_dir(self) -> Path:
        return Path(self.daemon.state_dir or ENV.default_state_dir())

    @property
    def dataset_cache_dir(self) -> Path:
        """Tokenized datasets: written by the daemon at attach, read by the finetune."""
        return self.state_dir / "datasets"

    @property
    def files_dir(self) -> Path:
        """Datasets uploaded through the HTTP API: written by it, recorded by the daemon."""
        return self.state_dir / "files"

    @property
    def output_roots(self) -> list[Path]:
        """Where job outputs may go: finetune.output_root (default STATE_DIR/jobs) first."""
        root = Path(self.finetune.output_root or self.state_dir / "jobs")
        return [root, *(Path(r) for r in self.finetune.extra_output_roots)]

    @property
    def vllm_metrics_dir(self) -> Path:
        """vLLM's Prometheus values as decode's engine records them (prometheus-client's
        multiprocess files): written by decode, read by the daemon's metrics page."""
        return self.runtime_dir / "vllm-metrics"

    @property
    def inference_endpoint(self) -> str:
        return self.endpoints.inference or f"ipc://{self.runtime_dir / 'inference.sock'}"

    @property
    def control_endpoint(self) -> str:
        return self.endpoints.control or f"ipc://{self.runtime_dir / 'control.sock'}"

    def internal_endpoint(self, name: str) -> str:
        """Daemon <-> child sockets; always ipc:// in the runtime dir (never on a network)."""
        return f"ipc://{self.runtime_dir / f'{name}.sock'}"

    @property
    def model_path(self) -> Path:
        if self.model.path:
            return Path(self.model.path)
        from harli.model.tiny import spec_tag

        return self.state_dir / "models" / f"tiny-{self.model.tiny_seed}-{spec_tag()}"

    def to_json(self) -> bytes:
        return msgspec.json.encode(dataclasses.asdict(self))


def parse_cpu_list(text: str) -> set[int]:
    """``"0-2,5"`` -> ``{0, 1, 2, 5}`` (the kernel's cpulist format)."""
    cores: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"expected 'auto', 'none' or a core list like '0-1,4', got {text!r}")
        cores.update(range(int(lo), int(hi if sep else lo) + 1))
    return cores


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: expected {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass(frozen=True)
class Env:
    """The environment, read once at import."""

    runtime_directory: str | None
    state_directory: str | None
    xdg_runtime_dir: str | None
    notify_socket: str | None
    uid: int
    harli_runtime_dir: str | None = None
    xdg_state_home: str | None = None

    @classmethod
    def read(cls) -> Env:
        return cls(
            runtime_directory=ipc_endpoints.first_dir(os.environ, "RUNTIME_DIRECTORY"),
            state_directory=ipc_endpoints.first_dir(os.environ, "STATE_DIRECTORY"),
            xdg_runtime_dir=os.environ.get("XDG_RUNTIME_DIR") or None,
            notify_socket=os.environ.get("NOTIFY_SOCKET") or None,
            uid=os.getuid(),
            harli_runtime_dir=os.environ.get(ipc_endpoints.RUNTIME_DIR_VAR) or None,
            xdg_state_home=os.environ.get("XDG_STATE_HOME") or None,
        )

    def default_runtime_dir(self) -> str:
        """The daemon's default; the order is ``harli.ipc.endpoints``' (clients share it)."""
        return ipc_endpoints.daemon_runtime_dir(self._environ(), self.uid)

    def default_state_dir(self) -> str:
        return ipc_endpoints.default_state_dir(self._environ())

    def _environ(self) -> dict[str, str]:
        env = {"RUNTIME_DIRECTORY": self.runtime_directory, "STATE_DIRECTORY":
               self.state_directory, "XDG_RUNTIME_DIR": self.xdg_runtime_dir,
               ipc_endpoints.RUNTIME_DIR_VAR: self.harli_runtime_dir,
               "XDG_STATE_HOME": self.xdg_state_home}
        return {k: v for k, v in env.items() if v}


ENV = Env.read()


def child_environ(cfg: HarliConfig, role: str = "decode") -> dict[str, str]:
    """The environment of a child process: ours, plus what vLLM and HF must see before import.

    vLLM runs in the child's own process (we step it), nothing may reach a model hub, and the KV
    cache size on CPU is an environment variable in vLLM.
    """
    env = dict(os.environ)
    env.update({
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.decode.kv_cache_gib),
        "PYTHONUNBUFFERED": "1",
    })
    # Only the daemon speaks to systemd: a child that saw these would kick (or be expected to
    # kick) the service's watchdog on the daemon's behalf.
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(var, None)
    # Both children share cores: OpenMP threads of the normal class must sleep, not spin, at
    # barriers (measured on 2 cores, before the finetune ran in the idle class: decode went
    # from 7.8 ms to 568 ms per step beside training with spinning).
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.pop("GOMP_SPINCOUNT", None)  # it would override the policy; only the finetune's is set
    if role == "decode" and cfg.decode.cpu_threads:
        env["OMP_NUM_THREADS"] = str(cfg.decode.cpu_threads)
    if role == "finetune":
        env.pop("OMP_NUM_THREADS", None)  # the quota sets torch's thread count per level
        # Its threads are in the idle class, so a spinning one yields to decode and the daemon
        # at once; a bounded spin is what lets two of them share an op's work at all (offline
        # on this VM, a LoRA micro-step at 2 threads: passive 1.15x one thread, spin 20000
        # 1.7x; with a spin, a pool thread left over by a lower level sleeps after it).
        if cfg.finetune.omp_spin_count:
            del env["OMP_WAIT_POLICY"]
            env["GOMP_SPINCOUNT"] = str(cfg.finetune.omp_spin_count)
    return env

_SECTIONS: dict[str, type[Any]] = {
    f.name: f.type if isinstance(f.type, type) else get_type_hints(HarliConfig)[f.name]
    for f in dataclasses.fields(HarliConfig)
}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if typ == tuple[str, ...]:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{key}: expected an array of strings, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover


def from_dict(data: dict[str, Any], source: str = "config") -> HarliConfig:
    """Build a validated config from a TOML-shaped dict; unknown keys are errors."""
    sections: dict[str, Any] = {}
    for name, body in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]; known sections: "
                              f"{', '.join(sorted(_SECTIONS))}")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        cls = _SECTIONS[name]
        hints = get_type_hints(cls)
        kwargs = {}
        for key, value in body.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {name}.{key}; known keys in "
                                  f"[{name}]: {', '.join(sorted(hints))}")
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        sections[name] = cls(**kwargs)
    return HarliConfig(**sections)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value`` (value in TOML syntax; bare words are strings)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load(path: str | os.PathLike[str] | None = None,
         overrides: list[str] | None = None) -> HarliConfig:
    """Load ``path`` (or defaults) and apply ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for text in overrides or []:
        section, key, value = parse_override(text)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        data[section][key] = value
    return from_dict(data, source)


def from_json(raw: bytes | str) -> HarliConfig:
    """Rebuild the config a parent process handed to a child (see ``to_json``)."""
    return from_dict(msgspec.json.decode(raw), "parent config")
