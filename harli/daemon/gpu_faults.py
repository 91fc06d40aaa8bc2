"""GPU faults under MPS: which child reports show one, and which other children must go too.

Under Volta+ MPS a fatal fault raised by a kernel of one client (a sticky 7xx CUDA error, ECC,
an Xid) is reported to *every* client of the server, and the server then stays in FAULT,
refusing new clients, until all of them have exited (NVIDIA's MPS documentation, §4.3.2).
So when one child shows such a fault, the healthy-looking sibling must be restarted as well.
This module holds that rule:

- ``classify_gpu_fault`` reads a child's last words (its Fatal traceback) or the MPS server log
  written since the last look, and names the fault: sticky 7xx CUDA errors, MPS errors 806/807,
  uncorrectable ECC, Xid. Error 810 (our own ``terminate_client``), out of memory and plain API
  errors are deliberately not faults: they stay with the calling client;
- ``FaultContainment`` turns a fault into a ``RestartBoth`` decision over the supervisor's
  ``Child`` objects, once per fault.

Pure logic: no OS calls, no MPS commands (those are ``daemon/mps.py``'s), so it is tested
with fake children.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from harli.daemon.supervisor import Child, ChildExited, ChildState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuFault:
    kind: str  # see _FAULT_PATTERNS
    evidence: str  # the line that matched

    def __str__(self) -> str:
        return f"{self.kind}: {self.evidence}"


def _rx(text: str) -> re.Pattern[str]:
    return re.compile(text, re.IGNORECASE)


# What a child's last words (its Fatal traceback) or the MPS server log show when a fault has
# poisoned the GPU for every MPS client on it; first match wins, most specific first.
_FAULT_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # MPS server log on a fatal fault (MPS doc §4.3.2, "Information about fatal GPU error
    # containment on Volta+ MPS"): the server then refuses clients until all affected ones exit.
    ("mps_server_fault", _rx(r"Server is handling a fatal GPU error"
                             r"|clients have a sticky error set")),
    # A client started (or reconnected) while the server is in FAULT gets 807: some other
    # client still holds the faulted context (MPS doc §3.3.1, server states).
    ("mps_server_fault", _rx(r"CUDA_ERROR_MPS_SERVER_NOT_READY|cudaErrorMpsServerNotReady"
                             r"|MPS server is not ready")),
    # 806: the client lost its server mid-run, as every other client of it did.
    ("mps_server_lost", _rx(r"CUDA_ERROR_MPS_RPC_FAILURE|cudaErrorMpsRpcFailure")),
    # CUDA runtime/driver errors that the CUDA docs call sticky ("leaves the process in an
    # inconsistent state ... the process must be terminated and relaunched"): 700 illegal
    # address, 702 launch timeout, 710 device assert, 714-719 (hardware stack error, illegal
    # instruction, misaligned address, invalid address space, invalid PC, launch failure).
    # They are raised by a kernel on the GPU, so under Volta+ MPS they are the "fatal GPU
    # fault" reported to every client (MPS doc §2.3.3.2). Names of both APIs, cudaGetErrorString
    # texts (torch prints "CUDA error: <text>"), and "CUDA error 7xx" forms.
    ("sticky_cuda_error", _rx(
        r"CUDA_ERROR_(?:ILLEGAL_ADDRESS|LAUNCH_TIMEOUT|ASSERT|HARDWARE_STACK_ERROR"
        r"|ILLEGAL_INSTRUCTION|MISALIGNED_ADDRESS|INVALID_ADDRESS_SPACE|INVALID_PC"
        r"|LAUNCH_FAILED)\b"
        r"|cudaError(?:IllegalAddress|LaunchTimeout|Assert|HardwareStackError"
        r"|IllegalInstruction|MisalignedAddress|InvalidAddressSpace|InvalidPc|LaunchFailure)\b"
        r"|an illegal memory access was encountered|device-side assert triggered"
        r"|an illegal instruction was encountered|unspecified launch failure"
        r"|the launch timed out and was terminated"
        # Generic words: only on a line that says CUDA.
        r"|CUDA\b.*\b(?:misaligned address|hardware stack error|invalid program counter"
        r"|operation not supported on global/shared address space)"
        r"|CUDA[ _]error\W{0,3}(?:700|702|710|71[4-9])\b")),
    # Uncorrectable ECC (cudaErrorECCUncorrectable, 214): the device memory itself is bad.
    ("ecc", _rx(r"CUDA_ERROR_ECC_UNCORRECTABLE|cudaErrorECCUncorrectable"
                r"|uncorrectable ECC error")),
    # The kernel driver's fault report ("NVRM: Xid (PCI:...): 31, pid=..."), when a child's
    # text includes it; any Xid there came with the child's end, so all are taken.
    ("xid", _rx(r"\bNVRM: Xid\b|\bXid \(PCI:")),
)

# Not faults, on purpose: CUDA_ERROR_MPS_CLIENT_TERMINATED (810) is what our own
# terminate_client leaves; out of memory (2) and other API errors stay with the calling client
# (MPS doc §2.3.3.2: "CUDA API errors generated on the CPU ... are delivered only to the
# calling client").


def classify_gpu_fault(text: str) -> GpuFault | None:
    """The GPU fault shown in ``text`` (a child's error and traceback, or new server-log
    lines) that takes every MPS client on the GPU down, or None."""
    for kind, pattern in _FAULT_PATTERNS:
        m = pattern.search(text)
        if m is not None:
            start = text.rfind("\n", 0, m.start()) + 1
            end = text.find("\n", m.end())
            line = text[start:end if end >= 0 else len(text)].strip()
            return GpuFault(kind, line[:300])
    return None


@dataclass(frozen=True)
class RestartBoth:
    """Decision: ``culprit`` showed a GPU fault, so ``siblings`` must be restarted too. MPS
    does not say which client caused it; the culprit is only the one that reported it."""

    fault: GpuFault
    culprit: str
    siblings: tuple[Child, ...]

    @property
    def reason(self) -> str:
        return (f"MPS: {self.culprit} ended with a GPU fault ({self.fault}); every client of the "
                f"GPU must exit before the MPS server accepts new ones")

    def apply(self) -> None:
        """SIGKILL each sibling (after ``terminate_client``, through its ``before_signal``
        hook); ``transition`` then reaps it and restarts it as a forced restart, not a crash:
        the sibling did nothing wrong, so this must not bring it closer to FATAL (the job
        manager requeues a finetune job to resume from its checkpoint)."""
        for child in self.siblings:
            child.restart(self.reason)


@dataclass
class FaultContainment:
    """The "restart both" rule while MPS is in use: when one child shows a GPU fault (in its
    Fatal report, or in the server log at its exit), every other live child is restarted.

    Pure logic over ``Child`` objects; the server calls ``on_fatal`` when a child reports its
    last words and ``on_exit`` for every ``ChildExited``, then ``apply()``s the decision.
    """

    server_log: Callable[[], str] = lambda: ""
    # (name, incarnation) already acted on, and siblings we killed: their ends do not cascade.
    _handled: set[tuple[str, int]] = field(default_factory=set)
    _killed: set[tuple[str, int]] = field(default_factory=set)

    def on_fatal(self, name: str, incarnation: int, text: str,
                 children: Iterable[Child]) -> RestartBoth | None:
        """A child's Fatal report: decide at once, not at its exit, so that the siblings stop
        holding the faulted server while the reporter winds down."""
        return self._decide(name, incarnation, classify_gpu_fault(text), children)

    def on_exit(self, ev: ChildExited, children: Iterable[Child]) -> RestartBoth | None:
        """A child's exit: the server log since the last look decides (a child that died by
        a signal leaves no report)."""
        return self._decide(ev.name, ev.incarnation, classify_gpu_fault(self.server_log()),
                            children)

    def _decide(self, name: str, incarnation: int, fault: GpuFault | None,
                children: Iterable[Child]) -> RestartBoth | None:
        key = (name, incarnation)
        if fault is None or key in self._handled:
            return None
        if key in self._killed:  # its fault report is the one we already acted on
            return None
        self._handled.add(key)
        siblings = tuple(c for c in children if c.name != name
                         and c.proc is not None
                         and c.state in (ChildState.STARTING, ChildState.RUNNING))
        if not siblings:
            logger.error("[mps] %s[%d] shows a GPU fault (%s); no other child is running",
                         name, incarnation, fault)
            return None
        logger.error("[mps] %s[%d] shows a GPU fault (%s); restarting %s too", name,
                     incarnation, fault, ", ".join(c.name for c in siblings))
        self._killed.update((c.name, c.incarnation) for c in siblings)
        return RestartBoth(fault, name, siblings)
