"""How the GPU backend is wired into the processes, with fakes on CPU: the ``gpu.share_weights``
key, the new wire fields, the daemon's relay of decode's weights (when to relay, when a job may
start, what a decode exit means) in ``WeightsRelay`` and through the daemon's own handlers, the
job manager's start gate, the finetune's choice between decode's weights and a copy from disk
(and the recipe built on shared weights), the quota description, and the KV hook's device
check for a CUDA arena."""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
import zmq

from harli.arena.weights import WeightShareError
from harli.config import ConfigError, HarliConfig, load
from harli.daemon.metrics import Metrics
from harli.daemon.weights_relay import WeightsRelay
from harli.datasets import SAMPLE_DATASET
from harli.decode_proc.engine import shares_weights, vllm_model
from harli.decode_proc.kv_arena import ArenaKVAllocation
from harli.finetune_proc import recipe as recipe_mod
from harli.finetune_proc.gpu_quota import GpuQuota, GreenSupport
from harli.finetune_proc.quota import CpuQuota
from harli.finetune_proc.recipe import LoRARecipe, shared_base
from harli.finetune_proc.shared_weights import LlamaShape, fused_from_hf
from harli.ipc.arena import ArenaHandle
from harli.ipc.codec import Decoder, encode
from harli.ipc.control import DaemonStatus
from harli.ipc.decode import DecodeToDaemon
from harli.ipc.finetune import DaemonToFinetune, Decision, FinetuneReady, FinetuneToDaemon, StartJob
from harli.ipc.jobs import JobSpec
from harli.ipc.weights import WeightExport, WeightsExported
from tests.unit.daemon.fake_procs import FakeOps

HANDLE = "ab" * 64


def _export(name: str = "model.norm.weight", handle: str = HANDLE) -> WeightExport:
    return WeightExport(name=name, handle=handle, alloc_bytes=2 << 20, offset_bytes=0,
                        shape=(256,), stride=(1,), dtype="bfloat16")


def _weights(generation: int = 1, n: int = 2, model: str = "/m") -> WeightsExported:
    return WeightsExported(generation=generation, model=model,
                           exports=tuple(_export(f"w{i}") for i in range(n)))


# -- config and wire ---------------------------------------------------------------------------


def test_share_weights_defaults_on_and_is_a_checked_bool() -> None:
    assert load(None).gpu.share_weights is True
    assert load(None, ["gpu.share_weights=false"]).gpu.share_weights is False
    with pytest.raises(ConfigError, match=r"gpu\.share_weights: expected true or false"):
        load(None, ["gpu.share_weights=1"])


def test_decode_exports_only_from_a_cuda_engine_with_a_finetune_and_the_key_on() -> None:
    on = load(None)
    assert shares_weights(on, "cuda")
    assert not shares_weights(on, "cpu")
    assert not shares_weights(load(None, ["gpu.share_weights=false"]), "cuda")
    assert not shares_weights(load(None, ["finetune.enabled=false"]), "cuda")


def test_weights_travel_decode_to_daemon_to_finetune() -> None:
    msg = _weights()
    assert Decoder(DecodeToDaemon).decode(encode(msg)) == msg
    assert Decoder(DaemonToFinetune).decode(encode(msg)) == msg


def test_finetune_ready_carries_the_quota_and_reads_without_it() -> None:
    ready = FinetuneReady(incarnation=2, pid=7, levels=4, quota="cpu threads+affinity")
    assert Decoder(FinetuneToDaemon).decode(encode(ready)) == ready
    old = msgspec.msgpack.encode(["FinetuneReady", 2, 7, 4])  # a sender without the field
    assert Decoder(FinetuneToDaemon).decode(old) == FinetuneReady(incarnation=2, pid=7,
                                                                  levels=4)


def test_status_shows_the_finetune_quota_and_reads_without_it() -> None:
    st = DaemonStatus(state="serving", pid=1, children=[], model=None, decode_iterations=0,
                      memory=None, job_running=None, jobs_queued=0, level=2,
                      finetune_quota="cpu threads+affinity")
    wire = msgspec.msgpack.decode(encode(st), type=DaemonStatus)
    assert wire.finetune_quota == "cpu threads+affinity"
    raw = msgspec.msgpack.decode(encode(st))
    del raw["finetune_quota"]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(raw),
                                  type=DaemonStatus).finetune_quota == ""


# -- WeightsRelay --------------------------------------------------------------------------------


class Sink:
    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.sent: list[WeightsExported] = []

    def __call__(self, msg: WeightsExported) -> bool:
        if self.ok:
            self.sent.append(msg)
        return self.ok


def test_relay_off_holds_nothing_back_and_keeps_nothing() -> None:
    r = WeightsRelay(enabled=False)
    assert r.may_start_job(1, None) and r.may_start_job(1, "cuda")
    assert not r.on_exported(_weights(), 1)
    assert not r.relay(1, Sink())
    assert r.on_decode_exit(1, job_running=True) is None


def test_jobs_wait_for_decodes_weights_on_a_cuda_host() -> None:
    r = WeightsRelay(enabled=True)
    assert not r.may_start_job(1, None)  # decode not ready yet: it may still export
    assert not r.may_start_job(1, "cuda")
    assert r.may_start_job(1, "cpu")  # a CPU engine exports nothing: nothing to wait for
    assert r.on_exported(_weights(generation=3), 3)
    assert not r.may_start_job(1, "cuda")  # kept, but the finetune does not have it yet
    sink = Sink()
    assert r.relay(1, sink) and sink.sent == [_weights(generation=3)]
    assert r.may_start_job(1, "cuda")
    assert not r.relay(1, sink) and len(sink.sent) == 1  # once per finetune incarnation
    assert not r.may_start_job(2, "cuda")  # a restarted finetune needs them again
    assert r.relay(2, sink) and r.may_start_job(2, "cuda")


def test_a_stale_export_is_ignored_and_a_failed_send_is_retried() -> None:
    r = WeightsRelay(enabled=True)
    assert not r.on_exported(_weights(generation=1), 2)
    assert r.latest is None
    r.on_exported(_weights(generation=2), 2)
    assert not r.relay(1, Sink(ok=False)) and not r.may_start_job(1, "cuda")
    assert r.relay(1, Sink()) and r.may_start_job(1, "cuda")


def test_an_empty_export_lets_jobs_load_their_own_copy() -> None:
    r = WeightsRelay(enabled=True)
    r.on_exported(_weights(n=0), 1)
    r.relay(1, Sink())
    assert r.may_start_job(1, "cuda")
    assert r.on_decode_exit(1, job_running=True) is None  # nothing of decode's was mapped


@pytest.mark.parametrize(("relayed_to", "finetune", "job_running", "restart"), [
    (1, 1, True, True),  # a job runs on views of the dead decode's memory
    (1, 1, False, False),  # idle: no views held; the next job waits for the new weights
    (1, 2, True, False),  # this finetune incarnation never got them (it loaded a copy)
    (None, 1, True, False),  # never relayed
])
def test_decode_exit_restarts_a_finetune_that_runs_a_job_on_its_weights(
        relayed_to: int | None, finetune: int, job_running: bool, restart: bool) -> None:
    r = WeightsRelay(enabled=True)
    r.on_exported(_weights(generation=4), 4)
    if relayed_to is not None:
        r.relay(relayed_to, Sink())
    reason = r.on_decode_exit(finetune, job_running)
    assert (reason is not None) is restart
    if reason is not None:
        assert "decode[4] exited" in reason and "checkpoint" in reason
    assert r.latest is None and not r.may_start_job(finetune, "cuda")  # until decode re-exports


# -- the daemon's handlers ---------------------------------------------------------------------


def _cfg(tmp_path: Path, *extra: str) -> HarliConfig:
    # A model path of its own: the daemon makes the tiny model only when none is given.
    return load(None, [f'daemon.runtime_dir="{tmp_path / "run"}"',
                       f'daemon.state_dir="{tmp_path / "state"}"', "memory.arena=false",
                       f'model.path="{tmp_path / "model"}"', 'decode.cpu_cores="none"', *extra])


class _FinetuneInbox:
    """Stands in for the daemon's socket to the finetune: keeps what is sent, decoded."""

    def __init__(self, sent: list[Any]) -> None:
        self.sent = sent
        self._decoder: Decoder[DaemonToFinetune] = Decoder(DaemonToFinetune)

    def send(self, data: bytes, flags: int = 0) -> None:
        self.sent.append(self._decoder.decode(data))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Any]:
    from harli.daemon.daemon import Daemon

    d = Daemon(_cfg(tmp_path), ops=FakeOps())
    d.weights = WeightsRelay(enabled=True)  # as on a CUDA host
    sent: list[Any] = []
    d.resources.finetune_in = _FinetuneInbox(sent)
    d.sent = sent
    d.decode.start(0.0)
    assert d.finetune is not None
    d.finetune.start(0.0)
    try:
        yield d
    finally:
        d._close()


def test_daemon_relays_decodes_weights_when_the_finetune_is_ready(daemon: Any) -> None:
    from harli.daemon.supervisor import ChildExited

    weights = _weights(generation=daemon.decode.incarnation, model=str(daemon.cfg.model_path))
    daemon._from_decode.dispatch(encode(weights))
    assert daemon.sent == []  # the finetune is not ready yet
    assert not daemon._may_start_job()
    daemon._from_finetune.dispatch(encode(FinetuneReady(
        incarnation=daemon.finetune.incarnation, pid=1, levels=4, quota="cpu threads+affinity")))
    assert daemon.sent[0] == weights  # before the decision and any job
    assert isinstance(daemon.sent[1], Decision)
    assert daemon._may_start_job()
    assert daemon.status().finetune_quota == "cpu threads+affinity"

    # decode dies while a job runs on its weights: the finetune is killed (and restarts)
    daemon.jobs.running = 1
    ops: FakeOps = daemon.finetune.ops
    daemon._on_decode_exit(ChildExited("decode", daemon.decode.incarnation, -9, True))
    assert (daemon.finetune.proc.pid, signal.SIGKILL) in ops.signals
    assert not daemon._may_start_job()  # until the new decode has exported again
    # A forced restart: not a crash of the finetune, but shown apart in status.
    daemon.finetune.transition(1.0)
    assert daemon.finetune.crashes == 0
    daemon.finetune.transition(1000.0)
    (fs,) = [c for c in daemon.status().children if c.name == "finetune"]
    assert fs.restarts == 1 and fs.forced_restarts == 1
    sample = daemon.metrics.registry.get_sample_value
    assert sample("harli_child_forced_restarts_total", {"child": "finetune"}) == 1
    assert sample("harli_child_restarts_total", {"child": "finetune"}) == 1


def test_daemon_relays_at_once_to_a_running_finetune_and_ignores_stale_exports(
        daemon: Any) -> None:
    daemon.finetune.on_ready(daemon.finetune.incarnation, 0.0)
    daemon._from_decode.dispatch(encode(_weights(generation=daemon.decode.incarnation + 1)))
    assert daemon.sent == []
    daemon._from_decode.dispatch(encode(_weights(generation=daemon.decode.incarnation)))
    assert daemon.sent == [_weights(generation=daemon.decode.incarnation)]


def test_daemon_on_a_cpu_host_relays_nothing_and_gates_nothing(tmp_path: Path) -> None:
    from harli.daemon.daemon import Daemon

    d = Daemon(_cfg(tmp_path), ops=FakeOps())
    try:
        assert not d.cuda_host and not d.weights.enabled and d._may_start_job()
    finally:
        d._close()


# -- the job manager's gate ----------------------------------------------------------------------


def test_job_manager_starts_no_job_while_the_gate_is_closed(tmp_path: Path) -> None:
    from harli.daemon.disabled import NullChild
    from harli.daemon.job_manager import JobManager
    from harli.daemon.quota import QuotaController

    sent: list[Any] = []
    cfg = _cfg(tmp_path)
    send = lambda m: sent.append(m) or True  # noqa: E731
    quota = QuotaController(cfg.finetune, send, NullChild("finetune"), None, Metrics())
    gate = [False]
    jm = JobManager(cfg, send, Metrics(), quota, may_start_job=lambda: gate[0])
    try:
        (tmp_path / "state").mkdir(exist_ok=True)
        jm.store.add(JobSpec(name="j", dataset=str(SAMPLE_DATASET),
                             output_dir=str(tmp_path / "out")), {})
        quota.on_finetune_ready()
        jm.on_ready()
        jm.tick()
        jm.tick()
        assert [type(m) for m in sent] == [Decision] and jm.running is None
        gate[0] = True
        jm.tick()
        assert isinstance(sent[-1], StartJob) and jm.running == 1
    finally:
        jm.close()


# -- the finetune ------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "weights", "shared"), [
    ("cpu", _weights(), False),  # CPU: always from disk
    ("cuda", None, False),  # nothing relayed
    ("cuda", _weights(n=0), False),  # decode could not export
    ("cuda", _weights(model="/other"), False),  # another model
    ("cuda", _weights(), True),
    ("cuda:0", _weights(), True),
])
def test_finetune_builds_on_decodes_weights_only_on_cuda(
        device: str, weights: WeightsExported | None, shared: bool) -> None:
    got = shared_base(device, weights, "/m")
    assert (got is not None) is shared
    if shared:
        assert weights is not None and got == weights.exports


def test_quota_description_names_the_mechanism() -> None:
    from harli.finetune_proc.proc import quota_description

    assert quota_description(CpuQuota(4, 2)) == "cpu threads+affinity"
    gq = GpuQuota(4, requested="green_context")
    gq.start(GreenSupport(None, "CUDA is not available", 50), None)
    desc = msgspec.json.decode(quota_description(gq))
    assert desc["mode"] == "mps_percentage" and desc["active_thread_pct"] == 50


def test_finetune_keeps_the_latest_weights_and_reports_its_quota(tmp_path: Path) -> None:
    from harli.finetune_proc.proc import FinetuneProc

    cfg = _cfg(tmp_path)
    cfg.runtime_dir.mkdir(parents=True)
    ctx = zmq.Context.instance()
    out = ctx.socket(zmq.PULL)
    out.bind(cfg.internal_endpoint("finetune-out"))
    proc = FinetuneProc(cfg, 3, CpuQuota(4, 2), device="cuda")
    try:
        proc._handle(_weights(generation=1))
        proc._handle(_weights(generation=2))
        assert proc.weights == _weights(generation=2)
        proc.request_stop("test")
        proc.run()  # sends READY, then stops at once
        assert out.poll(5000)
        ready = Decoder(FinetuneToDaemon).decode(out.recv())
        assert ready == FinetuneReady(incarnation=3, pid=ready.pid, levels=4,  # type: ignore[union-attr]
                                      quota="cpu threads+affinity")
    finally:
        proc.close()
        out.close(linger=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harli.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def _decodes_weights(tiny: Path) -> dict[str, torch.Tensor]:
    """What decode's vLLM model holds for the tiny model (fused q/k/v and gate/up)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    return fused_from_hf(hf.state_dict(), LlamaShape.from_config(hf.config))


def _spec(tmp_path: Path) -> JobSpec:
    return JobSpec(name="shared", dataset=str(SAMPLE_DATASET), output_dir=str(tmp_path / "out"),
                   max_steps=1, micro_batch_size=2, max_seq_len=64)


def test_recipe_trains_lora_on_decodes_weights_without_touching_them(
        tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = _decodes_weights(tiny)
    before = {n: t.clone() for n, t in tensors.items()}
    exports = tuple(_export(n) for n in tensors)
    seen: list[tuple[WeightExport, ...]] = []

    def fake_import(ex: Sequence[WeightExport]) -> dict[str, torch.Tensor]:
        seen.append(tuple(ex))
        return tensors  # what CUDA IPC would map: the very memory decode computes with

    monkeypatch.setattr(recipe_mod, "import_weights", fake_import)
    r = LoRARecipe(_spec(tmp_path), str(tiny), "cpu", exports)
    r.setup()
    try:
        assert seen == [exports] and r.base_source == "decode"
        storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
        base = [(n, p) for n, p in r.model.named_parameters() if ".lora_" not in n]
        assert base and all(p.untyped_storage().data_ptr() in storages and not p.requires_grad
                            for _, p in base)
        lora = {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad}
        assert lora and all(".lora_" in n for n in lora)
        res = r.train_micro_step()
        assert res.stepped and res.loss == res.loss  # a number, not NaN
        assert any(not torch.equal(p, lora[n]) for n, p in r.model.named_parameters()
                   if n in lora)
        assert all(torch.equal(tensors[n], before[n]) for n in tensors)  # decode's, unchanged
    finally:
        r.cleanup()


def test_recipe_loads_a_copy_when_decodes_weights_do_not_fit(
        tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def refuse(ex: Sequence[WeightExport]) -> dict[str, torch.Tensor]:
        raise WeightShareError("model.norm.weight: no shared tensor backs it")

    monkeypatch.setattr(recipe_mod, "import_weights", refuse)
    r = LoRARecipe(_spec(tmp_path), str(tiny), "cpu", (_export(),))
    r.setup()
    try:
        assert r.base_source == "disk"
        assert "cannot build the model on decode's weights" in caplog.text
        assert all(p.dtype == torch.float32 for p in r.model.parameters())
    finally:
        r.cleanup()


# -- decode ------------------------------------------------------------------------------------


class _FakeArena:
    def __init__(self, kind: str) -> None:
        self.handle = ArenaHandle(kind=kind, name="x", size_bytes=1 << 20, page_bytes=1 << 20,
                                  generation=1)
        self.buf = torch.ones(1 << 20, dtype=torch.int8)

    def tensor(self, offset: int, nbytes: int, dtype: Any = None) -> torch.Tensor:
        return self.buf[offset:offset + nbytes].view(dtype or torch.uint8)


def test_kv_buffer_is_taken_from_a_cuda_arena_only_when_asked_for_on_cuda() -> None:
    arena = _FakeArena("cuda")
    mode = ArenaKVAllocation(arena)  # type: ignore[arg-type]
    with mode:
        cpu = torch.zeros(4096, dtype=torch.int8)  # not the KV cache of a CUDA engine
        assert mode.nbytes is None and cpu.data_ptr() != arena.buf.data_ptr()
        kv = torch.zeros(4096, dtype=torch.int8, device="cuda")
    assert mode.nbytes == 4096 and kv.data_ptr() == arena.buf.data_ptr()
    assert int(kv.abs().sum()) == 0  # zeroed


def test_kv_buffer_from_a_shm_arena_as_before() -> None:
    arena = _FakeArena("shm")
    mode = ArenaKVAllocation(arena)  # type: ignore[arg-type]
    with mode:
        kv = torch.zeros(4096, dtype=torch.int8, device="cpu")
    assert mode.nbytes == 4096 and kv.data_ptr() == arena.buf.data_ptr()


def test_vllm_model_says_why_it_cannot_reach_the_model() -> None:
    class NoApply:
        pass

    class TwoWorkers:
        def apply_model(self, fn: Any) -> list[Any]:
            return [fn(torch.nn.Linear(1, 1)), fn(torch.nn.Linear(1, 1))]

    class Broken:
        def apply_model(self, fn: Any) -> list[Any]:
            raise ValueError("Cannot get model before model has been initialized")

    class One:
        model = torch.nn.Linear(1, 1)

        def apply_model(self, fn: Any) -> list[Any]:
            return [fn(self.model)]

    with pytest.raises(RuntimeError, match=r"no LLMEngine\.apply_model.*gpu\.share_weights"):
        vllm_model(NoApply())
    with pytest.raises(RuntimeError, match="2 workers; sharing weights needs exactly one"):
        vllm_model(TwoWorkers())
    with pytest.raises(RuntimeError, match=r"apply_model failed.*before model"):
        vllm_model(Broken())
    assert vllm_model(One()) is One.model
