"""``python -m harli.gpu_check.worker ROLE``: one GPU process of ``harli gpu-check``.

Each check needs its own processes (MPS clients, an IPC exporter and importer, a decode loop
beside a trainer), so the command starts this module once per process. Protocol, JSON lines
(msgspec, never pickle): the first line on stdin is the role's arguments; the worker writes
events ``{"event": ..., ...}`` on stdout, reads the parent's replies (``go``, ``check``,
``stop``, ...) on stdin, and ends with one ``result`` event or one ``error`` event (with the
traceback). Everything else it prints goes to stderr, so stdout carries nothing but events.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import IO, Any

import msgspec

logger = logging.getLogger("harli.gpu_check")

PAGE_BYTES = 2 << 20

# Llama shapes built in memory with random weights (no downloads): "tiny" is harli's own tiny
# model; "small" is TinyLlama-1.1B's shape, big enough that the GPU figures mean something.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 688,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4},
    "small": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
              "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4},
}


class Channel:
    """The worker's end of the JSON-lines conversation with ``harli gpu-check``."""

    def __init__(self, out: IO[str], inp: IO[str]) -> None:
        self._out = out
        self._in = inp
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        line = msgspec.json.encode({"event": event, **fields}).decode()
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()

    def read(self) -> dict[str, Any]:
        line = self._in.readline()
        if not line:
            raise EOFError("harli gpu-check closed the worker's stdin")
        msg: dict[str, Any] = msgspec.json.decode(line)
        return msg

    def wait(self, event: str) -> dict[str, Any]:
        msg = self.read()
        if msg.get("event") != event:
            raise RuntimeError(f"expected {event!r} from harli gpu-check, got {msg!r}")
        return msg


def llama_config(name: str, max_positions: int = 4096) -> Any:
    from transformers import LlamaConfig

    if name not in MODEL_SHAPES:
        raise ValueError(f"model must be one of {sorted(MODEL_SHAPES)}, got {name!r}")
    return LlamaConfig(**MODEL_SHAPES[name], max_position_embeddings=max_positions,
                       tie_word_embeddings=False)


def build_model(name: str, seed: int, max_positions: int = 4096) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda"):
        model: Any = LlamaForCausalLM(llama_config(name, max_positions))
    return model.to(dtype=torch.bfloat16)


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Roles
# ---------------------------------------------------------------------------------------------


def probe(ch: Channel, args: dict[str, Any]) -> None:
    """Versions, the device, and what this process can use for green contexts."""
    import subprocess

    import torch

    from harli.finetune_proc.gpu_quota import probe_green_support, query_partition

    info: dict[str, Any] = {"torch": str(torch.__version__), "torch_cuda": torch.version.cuda,
                            "python": sys.version.split()[0],
                            "cuda_available": bool(torch.cuda.is_available()),
                            "mps_pipe_dir": os.environ.get("CUDA_MPS_PIPE_DIRECTORY")}
    try:
        from cuda.bindings import driver

        _err, version = driver.cuDriverGetVersion()
        info["driver_cuda_version"] = f"{version // 1000}.{version % 1000 // 10}"
        info["cuda_python"] = True
    except ImportError:
        info["cuda_python"] = False
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=False)
        info["driver_version"] = smi.stdout.strip().splitlines()[0] if smi.stdout else None
    except (OSError, subprocess.TimeoutExpired):
        info["driver_version"] = None
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=int(props.multi_processor_count),
                    capability=f"{props.major}.{props.minor}",
                    total_memory_bytes=int(props.total_memory))
        support = probe_green_support(torch, os.environ)
        info["green_backend"] = support.backend
        info["green_reason"] = support.reason
        part = query_partition(0, info["sms"], (props.major, props.minor))
        info["partition"] = {"min_sms": part.min_sms, "granularity": part.granularity,
                             "source": part.source}
    ch.emit("result", **info)


def busy(ch: Channel, args: dict[str, Any]) -> None:
    """A loop of one-thread spin kernels (``torch.cuda._sleep``): each uses one SM, so two
    clients' kernels can run at once only if MPS lets them share the GPU."""
    import torch

    torch.empty(1, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calib = 2_000_000
    start.record()
    torch.cuda._sleep(calib)
    end.record()
    end.synchronize()
    cycles_per_ms = calib / max(start.elapsed_time(end), 1e-3)
    cycles = int(cycles_per_ms * float(args.get("kernel_ms", 10.0)))
    ch.emit("ready", pid=os.getpid())
    ch.wait("go")
    t0 = time.time()
    for _ in range(int(args.get("kernels", 100))):
        torch.cuda._sleep(cycles)
    _sync()
    t1 = time.time()
    ch.emit("result", start_s=t0, end_s=t1, own_s=t1 - t0, cycles_per_ms=cycles_per_ms)


def ipc_owner(ch: Channel, args: dict[str, Any]) -> None:
    """Create a CUDA arena, write page 0, hand out the handle; then check the peer's page 1."""
    import torch

    from harli.arena.cuda import CudaArena

    arena = CudaArena.create(int(args.get("size_bytes", 4 * PAGE_BYTES)), PAGE_BYTES)
    n = PAGE_BYTES // 4
    arena.tensor(0, PAGE_BYTES, torch.float32).copy_(
        torch.arange(n, dtype=torch.float32, device="cuda"))
    _sync()
    # The exporting process cannot open its own handle; attach() must reuse the mapping.
    same = CudaArena.attach(arena.handle)
    same_process_ok = same.base_address == arena.base_address
    ch.emit("handle", handle=msgspec.to_builtins(arena.handle))
    ch.wait("check")
    peer_ok = bool((arena.tensor(PAGE_BYTES, PAGE_BYTES, torch.int32) == 7).all())
    untouched = int(arena.tensor(2 * PAGE_BYTES, PAGE_BYTES).sum()) == 0
    ch.emit("result", peer_write_seen=peer_ok, untouched_page_zero=untouched,
            same_process_attach=same_process_ok, size_bytes=arena.handle.size_bytes)
    same.close()
    arena.close()


def ipc_peer(ch: Channel, args: dict[str, Any]) -> None:
    import torch

    from harli.arena.cuda import CudaArena
    from harli.ipc.arena import ArenaHandle

    handle = msgspec.convert(args["handle"], ArenaHandle)
    t0 = time.perf_counter()
    arena = CudaArena.attach(handle)
    open_ms = (time.perf_counter() - t0) * 1e3
    n = PAGE_BYTES // 4
    seen = torch.equal(arena.tensor(0, PAGE_BYTES, torch.float32),
                       torch.arange(n, dtype=torch.float32, device="cuda"))
    arena.tensor(PAGE_BYTES, PAGE_BYTES, torch.int32).fill_(7)
    _sync()
    arena.close()
    ch.emit("result", owner_write_seen=bool(seen), open_ms=open_ms)


def gemm(ch: Channel, args: dict[str, Any]) -> None:
    """GEMM throughput at each level's green context (full device first, as the reference)."""
    import torch

    from harli.finetune_proc.gpu_quota import start_gpu_quota
    from harli.gpu_check.report import gemm_tflops

    levels, n, iters = int(args["levels"]), int(args.get("n", 8192)), int(args.get("iters", 20))
    quota = start_gpu_quota(levels, 0, "green_context")
    if quota.mode != "green_context":
        ch.emit("result", skipped=quota.reason, quota=quota.describe())
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    _sync()
    rows, ref = [], None
    for level in range(levels, 0, -1):
        quota.apply(level)
        for _ in range(2):
            c = a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            c = a @ b
        end.record()
        end.synchronize()
        s = start.elapsed_time(end) / 1e3 / iters
        cf = c.float()
        if ref is None:
            ref = cf
        rel = float((cf - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        rows.append({"level": level, "sms": quota.sm_counts[level], "ms_per_gemm": s * 1e3,
                     "tflops": gemm_tflops(n, n, n, s),
                     "finite": bool(torch.isfinite(cf).all()), "max_rel_diff_vs_full": rel})
    quota.close()
    ch.emit("result", n=n, iters=iters, rows=rows[::-1], quota=quota.describe())


def decode(ch: Channel, args: dict[str, Any]) -> None:
    """A plain transformers decode loop: one token per iteration for a whole batch, each
    iteration timed from launch to its result on the host."""
    import torch

    from harli.gpu_check.report import latency_summary

    batch, prompt = int(args.get("batch", 16)), int(args.get("prompt_len", 256))
    iters, warmup = int(args.get("iters", 200)), int(args.get("warmup", 20))
    model = build_model(args.get("model", "small"), int(args.get("seed", 0)),
                        prompt + iters + warmup + 8).eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (batch, prompt), device="cuda",
                        generator=g)
    lat_ms = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(warmup + iters):
            _sync()
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            _sync()
            if i >= warmup:
                lat_ms.append((time.perf_counter() - t0) * 1e3)
    ch.emit("result", latencies_ms=lat_ms, summary=latency_summary(lat_ms), batch=batch,
            prompt_len=prompt)


def train(ch: Channel, args: dict[str, Any]) -> None:
    """A PEFT LoRA training loop at one quota level, until the parent says stop."""
    import torch
    from peft import LoraConfig, get_peft_model

    from harli.finetune_proc.gpu_quota import start_gpu_quota

    level, levels = int(args["level"]), int(args["levels"])
    quota = start_gpu_quota(levels, 0, str(args.get("quota", "green_context")))
    model = build_model(args.get("model", "small"), int(args.get("seed", 1)))
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, seq = int(args.get("batch", 8)), int(args.get("seq", 512))
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randint(10, model.config.vocab_size, (batch, seq), device="cuda", generator=g)
    stop = threading.Event()

    def watch() -> None:
        with contextlib.suppress(EOFError, RuntimeError):
            ch.wait("stop")
        stop.set()

    done, warm, measured, busy_s = 0, 2, 0, 0.0
    t_start: float | None = None
    while not stop.is_set():
        quota.apply(level)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        dt = time.perf_counter() - t0
        done += 1
        if t_start is None:
            if done == warm:  # compiled, allocated and steady: decode may start now
                threading.Thread(target=watch, daemon=True).start()
                ch.emit("ready", pid=os.getpid(), quota=quota.describe())
                t_start = time.perf_counter()
        else:
            measured += 1
            busy_s += dt
        idle = quota.idle_after(level, dt)
        if idle > 0:
            stop.wait(idle)
    wall = time.perf_counter() - (t_start or time.perf_counter())
    quota.close()
    ch.emit("result", steps=measured, wall_s=wall,
            steps_per_s=measured / wall if wall else 0.0,
            tokens_per_s=measured * batch * seq / wall if wall else 0.0, busy_s=busy_s,
            loss=float(loss), quota=quota.describe())


def _kv_shape(args: dict[str, Any]) -> tuple[int, ...]:
    return (int(args.get("layers", 22)), 2, int(args.get("blocks", 256)),
            int(args.get("block_size", 16)), int(args.get("kv_heads", 4)),
            int(args.get("head_dim", 64)))


def _kv_expected(shape: tuple[int, ...], seed: int) -> Any:
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)


def kv_owner(ch: Channel, args: dict[str, Any]) -> None:
    """A KV-cache-like tensor (layers, K/V, blocks, block size, kv heads, head dim) in a CUDA
    arena, written here; the reader checks it and writes the last block (a "lent" block)."""
    from harli.arena.cuda import CudaArena

    shape = _kv_shape(args)
    nbytes = math.prod(shape) * 2
    size = -(-nbytes // PAGE_BYTES) * PAGE_BYTES
    arena = CudaArena.create(size, PAGE_BYTES)
    kv = arena.tensor(0, nbytes, _bf16()).view(shape)
    expected = _kv_expected(shape, int(args.get("seed", 3)))
    kv.copy_(expected)
    _sync()
    ch.emit("handle", handle=msgspec.to_builtins(arena.handle), shape=list(shape))
    ch.wait("check")
    lent_ok = bool((kv[:, :, -1] == 1).all())
    rest_ok = bool((kv[:, :, :-1] == expected[:, :, :-1]).all())
    ch.emit("result", kv_bytes=nbytes, lent_block_written_by_reader=lent_ok,
            other_blocks_unchanged=rest_ok)
    arena.close()


def kv_reader(ch: Channel, args: dict[str, Any]) -> None:
    from harli.arena.cuda import CudaArena
    from harli.ipc.arena import ArenaHandle

    shape = tuple(int(s) for s in args["shape"])
    arena = CudaArena.attach(msgspec.convert(args["handle"], ArenaHandle))
    kv = arena.tensor(0, math.prod(shape) * 2, _bf16()).view(shape)
    seen = bool((kv == _kv_expected(shape, int(args.get("seed", 3)))).all())
    kv[:, :, -1] = 1
    _sync()
    arena.close()
    ch.emit("result", owner_kv_seen=seen)


def _bf16() -> Any:
    import torch

    return torch.bfloat16


def weights_owner(ch: Channel, args: dict[str, Any]) -> None:
    """The decode side: a model whose weights are vLLM-style fused tensors, exported by IPC."""
    import torch

    from harli.arena.weights import export_weights
    from harli.finetune_proc.shared_weights import LlamaShape, build_shared_model, fused_from_hf

    name = args.get("model", "small")
    hf = build_model(name, int(args.get("seed", 0))).eval()
    fused = fused_from_hf(hf.state_dict(), LlamaShape.from_config(hf.config))
    model = build_shared_model(hf.config, fused).eval()
    g = torch.Generator(device="cuda").manual_seed(4)
    ids = torch.randint(10, hf.config.vocab_size, (1, 32), device="cuda", generator=g)
    with torch.no_grad():
        plain = hf(input_ids=ids).logits[:, -1].float()
        logits = model(input_ids=ids).logits[:, -1].float()
    del hf
    torch.cuda.empty_cache()
    exports = export_weights(fused.items())
    ch.emit("exports", exports=msgspec.to_builtins(exports), input_ids=ids.tolist(),
            logits=logits.flatten().tolist())
    ch.wait("done")
    ch.emit("result", same_process_views_equal=bool(torch.equal(plain, logits)),
            tensors=len(exports), allocations=len({e.handle for e in exports}),
            weight_bytes=sum(t.numel() * t.element_size() for t in fused.values()))


def weights_reader(ch: Channel, args: dict[str, Any]) -> None:
    """The finetune side: map decode's weights, build the model on views, compare logits, and
    run one LoRA step to show training leaves the base weights alone."""
    import torch
    from peft import LoraConfig, get_peft_model

    from harli.arena.weights import import_weights
    from harli.finetune_proc.shared_weights import build_shared_model
    from harli.ipc.weights import WeightExport

    exports = msgspec.convert(args["exports"], list[WeightExport])
    torch.empty(1, device="cuda")
    before = torch.cuda.memory_allocated()
    tensors = import_weights(exports)
    model = build_shared_model(llama_config(args.get("model", "small")), tensors).eval()
    grown = torch.cuda.memory_allocated() - before
    ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
              for t in tensors.values()]
    inside = all(any(lo <= p.data_ptr() < hi for lo, hi in ranges)
                 for p in model.parameters())
    ids = torch.tensor(args["input_ids"], device="cuda")
    ref = torch.tensor(args["logits"], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -1].float().flatten()
    diff = float((logits - ref).abs().max())
    checksum = float(sum(t.float().sum() for t in tensors.values()))
    peft = get_peft_model(model.train(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peft(input_ids=ids, labels=ids).loss.backward()
    _sync()
    after = float(sum(t.float().sum() for t in tensors.values()))
    ch.emit("result", logits_equal=bool(torch.equal(logits, ref)), max_abs_diff=diff,
            params_inside_shared=inside, allocated_growth_bytes=grown,
            base_unchanged_after_lora_step=checksum == after)


ROLES: dict[str, Callable[[Channel, dict[str, Any]], None]] = {
    "probe": probe, "busy": busy, "ipc-owner": ipc_owner, "ipc-peer": ipc_peer, "gemm": gemm,
    "decode": decode, "train": train, "kv-owner": kv_owner, "kv-reader": kv_reader,
    "weights-owner": weights_owner, "weights-reader": weights_reader,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ROLES:
        sys.stderr.write(f"usage: python -m harli.gpu_check.worker {{{','.join(ROLES)}}}"
                         "\n")
        return 2
    # Events own stdout; anything else printed (by us, libraries or C code) goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s gpu-check[{argv[0]}] %(levelname)s %(message)s")
    ch = Channel(out, sys.stdin)
    try:
        args = ch.read()
        ROLES[argv[0]](ch, args)
    except BaseException as e:
        ch.emit("error", error=repr(e), traceback=traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
