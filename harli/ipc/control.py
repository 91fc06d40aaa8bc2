"""The control channel's wire types: ``harli attach`` / ``jobs`` / ``job ...`` / ``status``
<-> the daemon's control endpoint.

Map-encoded and tagged by ``type`` like the inference channel; errors are
``harli.ipc.inference.Error``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from harli.ipc.jobs import JobSpec


class _Ctl(msgspec.Struct, tag_field="type", kw_only=True, frozen=True,
           forbid_unknown_fields=True):
    pass


# Ids and event ids are SQLite rowids: 64-bit signed.
JobId = Annotated[int, Meta(ge=1, le=2**63 - 1)]
# Who made a job or an uploaded file: the HTTP front's digest of an API key ("" for the CLI,
# and for the HTTP front without keys configured).
Owner = Annotated[str, Meta(max_length=64)]
# An uploaded file's id, as OpenAI's files API names them; also its name in the files dir.
# (Patterns end in ``\Z``: Python's ``$``, which msgspec uses, also matches before a trailing
# newline.)
FileId = Annotated[str, Meta(min_length=6, max_length=69, pattern=r"^file-[A-Za-z0-9]+\Z")]

# A job's status: validating_files (its files being checked), queued, running, paused (running
# at quota level 0), held (paused by a user until resumed), succeeded, failed, cancelled.
JobStatus = Literal["validating_files", "queued", "running", "paused", "held", "succeeded",
                    "failed", "cancelled"]

# -- clients (the harli CLI, ControlClient) -> daemon ----------------------------------------


class AttachJob(_Ctl, tag="attach", frozen=True):
    """Store a job; the reply (``JobInfo``, status ``validating_files``) comes at once, and its
    files are checked in the background: it becomes ``queued``, or ``failed`` with the file
    and line at fault."""

    spec: JobSpec
    # Accepted from older clients and unused: the reply no longer waits for the files' check.
    wait_s: Annotated[float, Meta(gt=0, le=1e6)] | None = None
    owner: Owner = ""  # stored with the job (JobInfo.owner)


class ListJobs(_Ctl, tag="list_jobs", frozen=True):
    owner: Owner | None = None  # only this owner's jobs (None: every job)


class ShowJob(_Ctl, tag="show_job", frozen=True):
    job_id: JobId


class CancelJob(_Ctl, tag="cancel_job", frozen=True):
    job_id: JobId


class PauseJob(_Ctl, tag="pause_job", frozen=True):
    """Hold a job: a queued one is not scheduled, a running one stops after a checkpoint at
    its next step boundary; it stays ``held`` until resumed."""

    job_id: JobId


class ResumeJob(_Ctl, tag="resume_job", frozen=True):
    """Queue a held job again; it resumes from its last checkpoint."""

    job_id: JobId


class JobCheckpoints(_Ctl, tag="job_checkpoints", frozen=True):
    """A job's checkpoints still on disk, with the metrics of their steps."""

    job_id: JobId


class AddFile(_Ctl, tag="add_file", frozen=True):
    """Register an uploaded dataset file that the HTTP front has written (checked, fsynced)
    as ``<state_dir>/files/<file_id>.jsonl``; answered with its ``FileInfo``."""

    file_id: FileId
    filename: Annotated[str, Meta(min_length=1, max_length=255)]  # as uploaded
    purpose: Annotated[str, Meta(min_length=1, max_length=64)]
    owner: Owner = ""
    records: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    format: Annotated[str, Meta(max_length=64)] = ""


class ListFiles(_Ctl, tag="list_files", frozen=True):
    owner: Owner | None = None  # only this owner's files (None: every file)


class ShowFile(_Ctl, tag="show_file", frozen=True):
    file_id: FileId


class DeleteFile(_Ctl, tag="delete_file", frozen=True):
    """Remove an uploaded file and its record; refused while a job that has not ended uses
    it."""

    file_id: FileId


# Most events, and most metric events, one ``job_logs`` reply carries of each.
MAX_LOG_LIMIT = 100_000


class JobLogs(_Ctl, tag="job_logs", frozen=True):
    """A job's events and metric events after the ids given, oldest first, at most ``limit``
    of each; a reply with ``truncated`` set has more: ask again from its last ids."""

    job_id: JobId
    after_event: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0  # only events with a larger id
    after_metric: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0  # ... metric events, likewise
    limit: Annotated[int, Meta(ge=1, le=MAX_LOG_LIMIT)] = 10_000


class SetLevel(_Ctl, tag="set_level", frozen=True):
    """Fix the finetune's quota level (0 pauses it); answered with the ``DaemonStatus``."""

    level: int


class SetPolicy(_Ctl, tag="set_policy", frozen=True):
    """Switch the quota policy ("harli", "harli:strict", "harli:max", "static:L", "naive",
    "decode-only"); answered with the ``DaemonStatus``."""

    policy: str
    tpot_slo_ms: float | None = None  # a new SLO with it (None: keep the current one)


class GetStatus(_Ctl, tag="status", frozen=True):
    """What ``harli status`` shows: children, decode, the arena ledger, jobs."""


# An adapter's name: a job name, or a published checkpoint's ``NAME@step-N``.
AdapterName = Annotated[str, Meta(min_length=1, max_length=160,
                                  pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*\Z")]


class AddAdapter(_Ctl, tag="add_adapter", frozen=True):
    """Register a PEFT LoRA adapter directory of the served base model under ``name``;
    answered with its ``ModelInfo``."""

    name: AdapterName
    path: Annotated[str, Meta(min_length=1, max_length=4096)]  # absolute


class RemoveAdapter(_Ctl, tag="remove_adapter", frozen=True):
    """Unregister an adapter. Refused while requests use it unless ``force``, which ends them
    with ``finish_reason == "adapter_removed"``; answered with its ``ModelInfo``."""

    name: AdapterName
    force: bool = False


class ListModels(_Ctl, tag="list_models", frozen=True):
    """The servable models: the base model and every registered adapter."""


class GetMetrics(_Ctl, tag="get_metrics", frozen=True):
    """The daemon's Prometheus page, the one its metrics port serves on ``/metrics``; for a
    process that serves it on its own HTTP endpoint. Without ``tenant_series``, the series
    that name tenants' jobs (ids, tokens, losses) are left out: a page for whoever asks."""

    tenant_series: bool = True


ControlRequest = (AttachJob | ListJobs | ShowJob | CancelJob | PauseJob | ResumeJob | JobLogs
                  | JobCheckpoints | GetStatus | SetLevel | SetPolicy | AddAdapter
                  | RemoveAdapter | ListModels | AddFile | ListFiles | ShowFile | DeleteFile
                  | GetMetrics)

# -- daemon -> clients ----------------------------------------------------------------------


class ValidationStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where the check of a ``validating_files`` job's files stands."""

    # waiting (for a worker), checking (JSON, format, fields, limits: at disk speed),
    # tokenizing (into the cache the finetune reads)
    stage: str
    file: str = ""  # the job spec's field naming the file: dataset or validation_file
    bytes_done: int = 0
    bytes_total: int = 0
    records: int = 0


class JobInfo(_Ctl, tag="job", frozen=True):
    """A job's spec, status and progress, as the job store holds them."""

    job_id: int
    name: str
    status: JobStatus
    priority: int
    created_s: float
    started_s: float | None
    finished_s: float | None
    step: int  # optimizer steps done (as of the last report)
    total_steps: int | None
    epoch: int
    micro_steps: int
    tokens: int
    loss: float | None
    first_loss: float | None
    level: int | None  # current compute quota level
    paused_s: float
    tokens_per_s: float | None
    checkpoint_step: int | None
    restarts: int
    error: str | None
    adapter_path: str | None
    dataset_report: dict[str, int | str] | None
    spec: JobSpec
    # The model name its adapter is served under, once it succeeded (the job's name).
    fine_tuned_model: str | None = None
    # Its latest checkpoint's score on the job's validation file (None: none scored yet).
    valid_loss: float | None = None
    valid_accuracy: float | None = None
    owner: str = ""  # who made it (AttachJob.owner)
    validation: ValidationStatus | None = None  # while validating_files


class JobEvent(_Ctl, tag="event", frozen=True):
    event_id: int
    job_id: int
    time_s: float
    kind: str
    message: str


class TrainMetric(_Ctl, tag="train_metric", frozen=True):
    """A logged step (every ``JobSpec.log_every`` optimizer steps, and the last)."""

    metric_id: int  # increasing across all jobs and both kinds of metric event
    job_id: int
    time_s: float  # Unix time the daemon stored it
    step: int  # optimizer steps done
    epoch: float  # fractional, as HF's Trainer counts it
    train_loss: float | None  # mean micro-step loss since the previous logged step
    learning_rate: float
    grad_norm: float | None
    tokens: int  # trained so far
    tokens_per_s: float  # over the training time since the previous logged step
    level: int  # compute quota level


class ValidMetric(_Ctl, tag="valid_metric", frozen=True):
    """A checkpoint's score on the job's validation file."""

    metric_id: int
    job_id: int
    time_s: float
    step: int
    epoch: float
    valid_loss: float  # mean token cross-entropy
    valid_accuracy: float  # next-token accuracy (argmax), 0 ... 1
    examples: int
    tokens: int  # label tokens scored


JobMetric = TrainMetric | ValidMetric


class JobList(_Ctl, tag="job_list", frozen=True):
    jobs: list[JobInfo]


class JobDetail(_Ctl, tag="job_detail", frozen=True):
    job: JobInfo
    events: list[JobEvent]
    metrics: list[JobMetric] = []
    # ``job_logs``: a list was cut at the request's ``limit``; ask again after the last ids.
    truncated: bool = False


class CheckpointInfo(_Ctl, tag="checkpoint", frozen=True):
    """One checkpoint of a job, as written (its directory still exists)."""

    step: int  # optimizer steps done
    path: str  # its directory: a PEFT adapter directory
    created_s: float  # Unix time the daemon recorded it
    # Its model name when published (``NAME@step-N``, JobSpec.publish_checkpoints).
    served_as: str | None = None
    train_loss: float | None = None  # the logged step's, when that step was logged
    valid_loss: float | None = None  # its score on the validation file, when it has one
    valid_accuracy: float | None = None


class CheckpointList(_Ctl, tag="checkpoint_list", frozen=True):
    job_id: int
    checkpoints: list[CheckpointInfo]  # oldest first


class FileInfo(_Ctl, tag="file", frozen=True):
    """An uploaded dataset file."""

    file_id: str
    filename: str
    purpose: str
    owner: str
    size_bytes: int
    created_s: float
    path: str  # where the daemon keeps it: a job's ``dataset`` names it
    records: int
    format: str  # the dataset format its records are in


class FileList(_Ctl, tag="file_list", frozen=True):
    files: list[FileInfo]  # oldest first


class ChildStatus(_Ctl, tag="child", frozen=True):
    name: str
    state: str
    incarnation: int
    restarts: int
    pid: int | None
    # Of ``restarts``, those the daemon forced (MPS restart-both, decode's shared weights gone):
    # not crashes, so they never count toward supervisor.start_retries.
    forced_restarts: int = 0


class MemoryStatus(_Ctl, tag="memory", frozen=True):
    """The arena ledger and the lending between decode and the finetune."""

    page_bytes: int
    pages: dict[str, int]  # by owner: free / decode / finetune
    lending: bool
    blocks_per_group: int
    kv_groups: int
    groups_lent: int
    kv_blocks_total: int
    kv_blocks_free: int
    reclaim_pending: bool
    reclaims: dict[str, int]  # by outcome: returned / finetune_died / killed
    reclaim_p50_s: float | None
    reclaim_max_s: float | None
    saved_lease_bytes: int  # what autograd saved, placed in the lease (all micro-steps)
    saved_private_bytes: int  # ... and in private memory (the fallback)
    fallback_tensors: int
    preemptions: int  # vLLM's scheduler, this daemon's lifetime
    # Decode's zeroing of the blocks given back (ReturnBlocks), between two iterations:
    scrubs: int = 0
    scrub_max_s: float | None = None


class PredictorStatus(_Ctl, tag="predictor", frozen=True):
    """The latency predictor: from a profile or learning online, and how well it tracks."""

    mode: str  # "profile" or "online"
    profile: str | None
    samples_seen: dict[int, int]  # iterations observed, by quota level
    bias: dict[int, float]  # online correction (relative), by level
    drift_events: int
    fallback_predictions: int  # predictions at a level the profile has no fit for
    recent_mean_abs_pct_error: float | None
    # Unix times. ``since``: the profile's load, or online the first stage-1 fit from live
    # iterations (None: still on the prior); ``last_fit``: the latest online (re)fit.
    since: float | None = None
    last_fit: float | None = None
    online_refits: int = 0
    levels_learnt: dict[int, float] = {}  # online: when each level's own stage took over


class SchedulerStatus(_Ctl, tag="scheduler", frozen=True):
    """The quota policy and the decode SLO as measured (engine token times)."""

    policy: str
    tpot_slo_ms: float
    attainment_target: float
    per_token: float | None  # share of inter-token gaps under the SLO
    per_request: float | None  # share of finished requests whose mean TPOT is under it
    tokens: int
    requests: int
    decisions: int
    level_changes: int
    decision_p50_us: float | None
    decision_p99_us: float | None  # wall clock: preemption of the daemon included
    last_reason: str | None
    # The decision's own cost (thread CPU time): what the policy computes, without the time
    # the OS gave the daemon's core to someone else mid-decision.
    decision_cpu_p99_us: float | None = None
    # The quantile the last decision's latency bound stood for (harli's error budget moves
    # it); None for the baselines and before any busy decision.
    bound_quantile: float | None = None
    # Finetune tokens/s per quota level beside a busy decode, as measured (LevelRates).
    busy_rates_tok_s: dict[int, float] = {}
    # Decisions since the policy was set, by the reason's first word and the level emitted
    # (PolicyDecision.kind): {"steady": {2: 310}, "infeasible": {0: 12, 2: 40}, ...}.
    decisions_by_reason: dict[str, dict[int, int]] = {}


class DaemonStatus(_Ctl, tag="daemon_status", frozen=True):
    state: str
    pid: int
    children: list[ChildStatus]
    model: str | None
    decode_iterations: int
    memory: MemoryStatus | None
    job_running: int | None
    jobs_queued: int
    level: int  # the finetune's quota level now
    predictor: PredictorStatus | None = None
    scheduler: SchedulerStatus | None = None
    finetune_quota: str = ""  # how the finetune's quota is enforced (its FinetuneReady.quota)
    http_url: str = ""  # where the OpenAI-compatible HTTP API answers; "" while it does not


class ModelInfo(_Ctl, tag="model", frozen=True):
    """One servable model."""

    name: str  # what a request's ``model`` names
    kind: str  # "base" or "adapter"
    path: str  # the base model's directory, or the adapter's
    source: str  # "model" (the base), "job", "checkpoint" (NAME@step-N) or "path"
    job_id: int | None = None  # the job that trained it
    step: int | None = None  # a published checkpoint's optimizer step
    rank: int | None = None
    created_s: float | None = None  # registered at (unix time)
    loaded: bool = False  # held by vLLM now (an adapter not loaded is read from disk first)
    requests: int = 0  # requests being served with it now


class ModelList(_Ctl, tag="model_list", frozen=True):
    models: list[ModelInfo]


class MetricsPage(_Ctl, tag="metrics_page", frozen=True):
    """The answer to ``get_metrics``: the page and the HTTP ``Content-Type`` to serve it
    with."""

    text: str  # Prometheus' text exposition format
    content_type: str  # "text/plain; version=0.0.4; charset=utf-8"


ControlReply = (JobInfo | JobList | JobDetail | DaemonStatus | ModelInfo | ModelList
                | CheckpointList | FileInfo | FileList | MetricsPage)
