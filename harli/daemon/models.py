"""``ModelCatalog``: what a request may name as its model, and the control requests that change it.

A servable model is the base model (a request without ``model``, or with the base model's
name) or a registered LoRA adapter (``AdapterRegistry``). The catalog resolves a request's
model to the ``LoraTarget`` decode serves it with, or refuses it naming the models it knows;
registers a finished job's adapter under the job's name and, for a job that publishes them, each
checkpoint as ``NAME@step-N``; answers ``harli adapter add / rm`` and ``harli models``. It
checks every adapter directory (``harli.adapters.inspect_adapter``) before it is registered,
and tells decode to drop an adapter that is removed. It knows the requests in flight only
through the callables it is given.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from harli.adapters import AdapterError, inspect_adapter
from harli.config import HarliConfig
from harli.daemon.adapter_registry import Adapter, AdapterRegistry, DuplicateAdapter
from harli.ipc.control import AddAdapter, ListModels, ModelInfo, ModelList, RemoveAdapter
from harli.ipc.decode import DaemonToDecode, LoraTarget, UnloadAdapter
from harli.ipc.inference import Error, ErrorCode
from harli.paths import BadPath, check_path

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(r"@step-\d+$")


class UnknownModel(Exception):
    """A request's model is neither the base model nor a registered adapter."""


class ModelCatalog:
    def __init__(self, cfg: HarliConfig, registry: AdapterRegistry,
                 send_decode: Callable[[DaemonToDecode], bool],
                 job_event: Callable[[int, str, str], None],
                 job_served_as: Callable[[int, str], None] = lambda job_id, name: None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.send_decode = send_decode
        self.job_event = job_event  # (job_id, kind, message) into the job's event log
        self.job_served_as = job_served_as  # (job_id, model): a finished job's fine_tuned_model
        self.base_dir = Path(cfg.model_path)
        self.base_name = self.base_dir.name
        self._loaded: set[int] = set()  # lora ids vLLM holds, as decode last said
        # The registry by name, read once: resolve() runs for every request.
        self._by_name: dict[str, Adapter] = {a.name: a for a in registry.all()}

    # -- requests ----------------------------------------------------------------------------

    def resolve(self, model: str | None) -> LoraTarget | None:
        """The adapter serving a request for ``model`` (None: the base model)."""
        if model is None or model in (self.base_name, str(self.base_dir)):
            return None
        adapter = self._by_name.get(model)
        if adapter is None:
            raise UnknownModel(f"unknown model {model!r}; this daemon serves "
                               f"{', '.join(repr(n) for n in self.names())}")
        if not self.cfg.lora.enabled:
            raise UnknownModel(f"model {model!r} is a LoRA adapter, and this daemon serves the "
                               f"base model only (lora.enabled = false)")
        return LoraTarget(name=adapter.name, lora_id=adapter.lora_id, path=adapter.path)

    def names(self) -> list[str]:
        return [self.base_name, *self._by_name]

    def on_loaded(self, lora_ids: list[int]) -> None:
        self._loaded = set(lora_ids)

    def on_decode_exit(self) -> None:
        self._loaded = set()  # a new decode loads each adapter again when asked

    # -- control -----------------------------------------------------------------------------

    def list_models(self, _: ListModels, in_use: Mapping[str, int]) -> ModelList:
        base = ModelInfo(name=self.base_name, kind="base", path=str(self.base_dir),
                         source="model", loaded=True, requests=in_use.get(self.base_name, 0))
        return ModelList(models=[base, *(self._info(a, in_use.get(a.name, 0))
                                         for a in self._by_name.values())])

    def add(self, msg: AddAdapter) -> ModelInfo | Error:
        if not self.cfg.lora.enabled:
            return Error(request_id=None, code=ErrorCode.INVALID,
                         message="this daemon serves the base model only (lora.enabled = "
                                 "false): an adapter added now could not be called")
        taken = self._taken(msg.name)
        if taken is not None:
            return taken
        if _CHECKPOINT_NAME.search(msg.name):
            return Error(request_id=None, code=ErrorCode.INVALID,
                         message=f"adapter name {msg.name!r}: names ending in @step-N are "
                                 f"those of published job checkpoints")
        try:
            # A client's path: one that names no file (a NUL, a component over NAME_MAX) is
            # refused before any system call raises on it.
            check_path(msg.path, "path")
            adapter = self._register(msg.name, msg.path, "path")
        except (AdapterError, BadPath) as e:
            return Error(request_id=None, code=ErrorCode.INVALID, message=str(e))
        except OSError as e:  # a directory the daemon may not look into, ...
            return Error(request_id=None, code=ErrorCode.INVALID,
                         message=f"adapter path {msg.path!r}: {e.strerror or e}")
        return self._info(adapter, 0)

    def remove(self, msg: RemoveAdapter, in_use: Mapping[str, int],
               abort: Callable[[str], int]) -> ModelInfo | Error:
        """``abort(name)`` ends the requests served with that adapter (``--force``)."""
        adapter = self._by_name.get(msg.name)
        if adapter is None:
            known = ", ".join(repr(n) for n in self._by_name) or "none"
            what = "the base model, which cannot be removed" if msg.name == self.base_name \
                else "not a registered adapter"
            return Error(request_id=None, code=ErrorCode.NOT_FOUND,
                         message=f"{msg.name!r} is {what}; adapters: {known}")
        busy = in_use.get(msg.name, 0)
        if busy and not msg.force:
            return Error(request_id=None, code=ErrorCode.CONFLICT,
                         message=f"adapter {msg.name!r} is serving {busy} request(s); wait for "
                                 f"them, or remove it with --force to end them")
        info = self._info(adapter, busy)
        if busy:
            ended = abort(msg.name)
            logger.warning("[models] adapter %s removed with --force: %d request(s) ended",
                           msg.name, ended)
        self.registry.remove(msg.name)
        del self._by_name[msg.name]
        self.send_decode(UnloadAdapter(lora_id=adapter.lora_id))
        self._loaded.discard(adapter.lora_id)
        logger.info("[models] adapter %s (lora id %d) removed", msg.name, adapter.lora_id)
        return info

    # -- jobs --------------------------------------------------------------------------------

    def on_job_succeeded(self, job_id: int, name: str, adapter_path: str | None) -> None:
        """A finished job's adapter becomes servable under the job's name."""
        if self._register_job(job_id, name, adapter_path, "job", None):
            self.job_served_as(job_id, name)

    def on_checkpoint(self, job_id: int, name: str, step: int, path: str) -> None:
        """A checkpoint of a job that publishes them becomes ``NAME@step-N``."""
        self._register_job(job_id, f"{name}@step-{step}", path, "checkpoint", step)

    def _register_job(self, job_id: int, name: str, path: str | None, source: str,
                      step: int | None) -> bool:
        if not self.cfg.lora.enabled:
            return False
        if path is None:
            self.job_event(job_id, "serving", f"not served as {name}: the job saved no adapter")
            return False
        if name in self._by_name or name == self.base_name:
            self.job_event(job_id, "serving", f"not served as {name}: the name is taken by "
                                              f"another model")
            return False
        try:
            adapter = self._register(name, path, source, job_id, step)
        except AdapterError as e:
            logger.error("[models] job %d's adapter %s is not servable: %s", job_id, path, e)
            self.job_event(job_id, "serving", f"not served as {name}: {e}")
            return False
        self.job_event(job_id, "serving", f"served as model {name!r} (lora id "
                                          f"{adapter.lora_id})")
        return True

    # -- helpers -----------------------------------------------------------------------------

    def _taken(self, name: str) -> Error | None:
        if name == self.base_name or name in self._by_name:
            what = "the base model's" if name == self.base_name else "an adapter's"
            return Error(request_id=None, code=ErrorCode.CONFLICT,
                         message=f"the name {name!r} is taken ({what}); remove it first or "
                                 f"choose another")
        return None

    def _register(self, name: str, path: str, source: str, job_id: int | None = None,
                  step: int | None = None) -> Adapter:
        info = inspect_adapter(path, base_model_dir=self.base_dir,
                               max_rank=self.cfg.lora.max_lora_rank)
        try:
            adapter = self.registry.add(name, info, source, job_id, step)
        except DuplicateAdapter:
            raise AdapterError(f"the name {name!r} is taken") from None
        self._by_name[name] = adapter
        logger.info("[models] adapter %s registered (lora id %d, rank %d, %s)", name,
                    adapter.lora_id, adapter.rank, adapter.path)
        return adapter

    def _info(self, a: Adapter, requests: int) -> ModelInfo:
        return ModelInfo(name=a.name, kind="adapter", path=a.path, source=a.source,
                         job_id=a.job_id, step=a.step, rank=a.rank, created_s=a.created_s,
                         loaded=a.lora_id in self._loaded, requests=requests)
