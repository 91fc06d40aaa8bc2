"""The finetune channel's wire types: daemon <-> finetune_proc.

Internal family: ``array_like`` structs tagged by their class name (like ``harli.ipc.decode``).
"""

from __future__ import annotations

import msgspec

from harli.ipc.jobs import JobSpec
from harli.ipc.weights import WeightsExported

# -- daemon <-> finetune_proc -----------------------------------------------------------------


class _Internal(msgspec.Struct, tag=True, kw_only=True, array_like=True, frozen=True):
    pass


class StartJob(_Internal, frozen=True):
    job_id: int
    spec: JobSpec
    model_path: str


class StopJob(_Internal, frozen=True):
    """Stop the running job at its next micro-step boundary, keeping checkpoints: a cancel
    (ends ``cancelled``), or with ``keep_progress`` a pause, which ends ``stopped`` after a
    checkpoint of its last optimizer step, so that it resumes where it stopped. One partway
    through a gradient accumulation finishes it first while it may train; while the quota
    gives it nothing, it drops the partial accumulation and resumes from its last
    checkpoint."""

    job_id: int
    reason: str
    keep_progress: bool = False


class Decision(_Internal, frozen=True):
    """The daemon's latest word on the finetune: quota level (0 = nothing admitted)."""

    level: int
    admitted: bool
    seq: int


class FinetuneShutdown(_Internal, frozen=True):
    reason: str


class GrantLease(_Internal, frozen=True):
    """Arena pages lent to the finetune for the tensors autograd saves; they are its own until
    a ``ReclaimLease`` asks for them back."""

    seq: int
    pages: list[int]


class ReclaimLease(_Internal, frozen=True):
    """Give ``pages`` back at the next micro-step or chunk boundary, before ``deadline_s``
    (monotonic clock); a finetune that misses the deadline is stopped and restarted from its
    checkpoint."""

    seq: int
    pages: list[int]
    deadline_s: float


class LeaseRefused(_Internal, frozen=True):
    """The daemon's typed error for a lease message it could not apply (ledger unchanged)."""

    seq: int
    message: str


# WeightsExported (harli.ipc.weights): decode's, relayed by the daemon before any StartJob that
# may use them (CUDA hosts with gpu.share_weights).
DaemonToFinetune = (StartJob | StopJob | Decision | FinetuneShutdown | GrantLease
                    | ReclaimLease | LeaseRefused | WeightsExported)


class FinetuneReady(_Internal, frozen=True):
    incarnation: int
    pid: int
    levels: int
    # How the quota is enforced: "cpu threads+affinity", or GpuQuota.describe() as JSON.
    quota: str = ""


class MicroStepReport(_Internal, frozen=True):
    job_id: int
    micro_step: int
    step: int
    epoch: int
    tokens: int  # trained so far in this job (restored from the checkpoint on resume)
    step_tokens: int  # in this micro-step
    duration_s: float
    level: int
    loss: float
    paused_s: float  # spent paused since the previous report
    total_steps: int
    # Where the tensors autograd saved in this micro-step went (``ActivationLease``).
    lease_bytes: int = 0
    lease_saved_bytes: int = 0
    private_saved_bytes: int = 0
    fallback_tensors: int = 0
    chunks: int = 1
    # Duty-cycle idle the quota imposes after this micro-step (the level's rate counts it).
    idle_after_s: float = 0.0
    # Times it narrowed its thread pool mid-chunk to a CPU fence of the daemon's.
    fence_follows: int = 0


class JobStarted(_Internal, frozen=True):
    job_id: int
    resumed_from_step: int | None
    total_steps: int
    dataset_report: dict[str, int | str]


class StepLogged(_Internal, frozen=True):
    """A logged step (every ``JobSpec.log_every`` optimizer steps, and the last): what the
    steps since the previous one did, as HF's Trainer logs it."""

    job_id: int
    step: int  # optimizer steps done
    epoch: float  # micro-steps done / micro-batches per epoch
    loss: float | None  # mean of the micro-steps' losses (None: no label token in any)
    learning_rate: float  # the scheduler's, as used by this step
    grad_norm: float | None  # L2 norm of the adapter's gradient at this step
    tokens: int  # trained so far in this job
    tokens_per_s: float  # the steps' tokens over their training time (waits left out)
    level: int  # the quota level of its last micro-step


class ValidationScore(msgspec.Struct, kw_only=True, array_like=True, frozen=True):
    """The adapter scored on the job's validation file (teacher forcing, no gradient)."""

    loss: float  # mean token cross-entropy over the label tokens after the first
    accuracy: float  # share of those tokens the model's argmax predicts
    examples: int
    tokens: int  # label tokens scored
    duration_s: float


class CheckpointSaved(_Internal, frozen=True):
    job_id: int
    step: int
    path: str
    epoch: float = 0.0  # fractional, as in its trainer_state.json
    # Scored before the checkpoint was written (its trainer_state.json holds it); None: the job
    # has no validation file, or the scoring was given up (``validation_error`` says why).
    validation: ValidationScore | None = None
    validation_error: str | None = None


# JobEnded.status of a job stopped by StopJob(keep_progress=True): not over, resumable.
STOPPED = "stopped"


class JobEnded(_Internal, frozen=True):
    job_id: int
    status: str  # succeeded, failed, cancelled, stopped
    error: str | None
    adapter_path: str | None


class FinetuneFatal(_Internal, frozen=True):
    incarnation: int
    error: str
    traceback: str


class LeaseReturned(_Internal, frozen=True):
    """Pages given back: the answer to ``ReclaimLease`` (same ``seq``), or ``seq`` 0 when the
    finetune gives them up on its own (job ended)."""

    seq: int
    pages: list[int]
    reason: str
    # The finetune zeroed every page it wrote (``ActivationLease.take_back``), so decode need
    # not; False (a finetune that does not say) makes decode zero the blocks itself.
    clean: bool = False


FinetuneToDaemon = (FinetuneReady | MicroStepReport | StepLogged | JobStarted | CheckpointSaved
                    | JobEnded | FinetuneFatal | LeaseReturned)
