"""The GPU fault classifier and the restart-both rule, on fake children: which reports and
server-log lines are faults (and which are deliberately not), and which siblings get killed."""

from __future__ import annotations

import pytest

from harli.config import SupervisorConfig
from harli.daemon.gpu_faults import FaultContainment, classify_gpu_fault
from harli.daemon.supervisor import Child, ChildExited, ChildState

from .fake_procs import FakeOps

# -- fault classifier --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kind"), [
    ("torch.AcceleratorError: CUDA error: an illegal memory access was encountered\n"
     "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.", "sticky_cuda_error"),
    ("RuntimeError: CUDA error: device-side assert triggered", "sticky_cuda_error"),
    ("CUresult.CUDA_ERROR_ILLEGAL_ADDRESS", "sticky_cuda_error"),
    ("cudaErrorLaunchFailure: unspecified launch failure", "sticky_cuda_error"),
    ("RuntimeError: CUDA error: misaligned address", "sticky_cuda_error"),
    ("CUDA error 719 in kernel", "sticky_cuda_error"),
    ("[2022-04-28 15:56:08.906 Other 11570] Volta MPS: Server is handling a fatal GPU error.",
     "mps_server_fault"),
    ("Volta MPS: The following clients have a sticky error set:", "mps_server_fault"),
    ("cuInit failed: CUDA_ERROR_MPS_SERVER_NOT_READY", "mps_server_fault"),
    ("CUDA_ERROR_MPS_RPC_FAILURE", "mps_server_lost"),
    ("CUDA error: uncorrectable ECC error encountered", "ecc"),
    ("NVRM: Xid (PCI:0000:3b:00): 31, pid=4242, name=python", "xid"),
])
def test_gpu_faults_are_recognised(text: str, kind: str) -> None:
    fault = classify_gpu_fault("Traceback (most recent call last):\n  ...\n" + text)
    assert fault is not None and fault.kind == kind
    assert fault.evidence in text and "\n" not in fault.evidence


@pytest.mark.parametrize("text", [
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "CUDA_ERROR_MPS_CLIENT_TERMINATED",  # our own terminate_client
    "ValueError: misaligned address in the parser",  # the words without CUDA
    "KeyError: 'x'",
    "[2013-08-05 13:00:09.270 Server 13929] Client 14777 disconnected",
    "",
])
def test_other_errors_are_not_gpu_faults(text: str) -> None:
    assert classify_gpu_fault(text) is None


# -- restart both ------------------------------------------------------------------------------


CFG = SupervisorConfig(backoff_initial_s=1, start_retries=3)


def two_children(log: list[str]) -> tuple[Child, Child, FakeOps]:
    ops = FakeOps(log)
    def hook(pid: int) -> None:
        log.append(f"terminate_client {pid}")

    decode = Child("decode", lambda i: ["d"], {}, CFG, ops, before_signal=hook)
    finetune = Child("finetune", lambda i: ["f"], {}, CFG, ops, before_signal=hook)
    for c in (decode, finetune):
        c.start(0.0)
        c.on_ready(1, 1.0)
    return decode, finetune, ops


def test_a_fault_report_restarts_the_sibling_as_a_forced_restart() -> None:
    log: list[str] = []
    decode, finetune, _ = two_children(log)
    fc = FaultContainment()
    d = fc.on_fatal("finetune", 1, "RuntimeError: CUDA error: an illegal memory access was "
                    "encountered", [decode, finetune])
    assert d is not None and d.culprit == "finetune" and d.siblings == (decode,)
    assert d.fault.kind == "sticky_cuda_error" and "every client" in d.reason
    d.apply()
    # terminate_client first, then SIGKILL; nothing sent to the faulting finetune itself.
    assert log == ["terminate_client 100", "signal SIGKILL 100"]
    ev = decode.transition(2.0)
    assert ev == [ChildExited("decode", 1, -9, True)] and decode.state is ChildState.BACKOFF
    assert decode.crashes == 0  # the sibling did nothing wrong: no step closer to FATAL
    decode.transition(3.0)
    assert decode.state is ChildState.STARTING and decode.incarnation == 2
    assert decode.restarts == 1 and decode.forced_restarts == 1
    # The sibling's own exit, and the culprit's, do not cascade a second time.
    assert fc.on_exit(ev[0], [decode, finetune]) is None
    finetune.proc.returncode = 1  # type: ignore[union-attr]
    (fev,) = finetune.transition(3.0)
    assert isinstance(fev, ChildExited) and fc.on_exit(fev, [decode, finetune]) is None


def test_the_server_log_at_an_exit_restarts_the_others() -> None:
    log: list[str] = []
    decode, finetune, _ = two_children(log)
    logs = iter(["[x Other 1] Volta MPS: Server is handling a fatal GPU error.\n", ""])
    fc = FaultContainment(server_log=lambda: next(logs))
    decode.proc.returncode = -11  # type: ignore[union-attr]  # segfault: no report at all
    (ev,) = decode.transition(2.0)
    assert isinstance(ev, ChildExited)
    d = fc.on_exit(ev, [decode, finetune])
    assert d is not None and d.siblings == (finetune,) and d.fault.kind == "mps_server_fault"
    d.apply()
    assert log == ["terminate_client 101", "signal SIGKILL 101"]


def test_a_plain_crash_restarts_only_itself() -> None:
    log: list[str] = []
    decode, finetune, _ = two_children(log)
    fc = FaultContainment(server_log=lambda: "Client 14777 disconnected\n")
    assert fc.on_fatal("finetune", 1, "ValueError: bad dataset row", [decode, finetune]) is None
    finetune.proc.returncode = 1  # type: ignore[union-attr]
    (ev,) = finetune.transition(2.0)
    assert isinstance(ev, ChildExited) and fc.on_exit(ev, [decode, finetune]) is None
    assert log == [] and decode.state is ChildState.RUNNING


def test_no_live_sibling_means_nothing_to_do() -> None:
    log: list[str] = []
    decode, finetune, _ = two_children(log)
    finetune.proc.returncode = 1  # type: ignore[union-attr]
    finetune.transition(2.0)  # BACKOFF: no process to restart
    fc = FaultContainment()
    assert fc.on_fatal("decode", 1, "CUDA_ERROR_ILLEGAL_ADDRESS", [decode, finetune]) is None
    assert log == []


def test_the_same_fault_is_acted_on_once() -> None:
    log: list[str] = []
    decode, finetune, _ = two_children(log)
    fc = FaultContainment()
    text = "CUDA error: an illegal memory access was encountered"
    assert fc.on_fatal("finetune", 1, text, [decode, finetune]) is not None
    assert fc.on_fatal("finetune", 1, text, [decode, finetune]) is None
    # The killed sibling's own report of the same fault does not bounce back.
    assert fc.on_fatal("decode", 1, text, [decode, finetune]) is None
