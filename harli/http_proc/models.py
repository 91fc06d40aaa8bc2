"""``DaemonModels``: vLLM's ``OpenAIServingModels`` whose adapters are the daemon's registry.

vLLM's serving layer knows a model by its ``lora_requests`` table; Harli's adapters are
registered with the daemon (finished jobs, ``harli adapter add``, vLLM's own
``/v1/load_lora_adapter``), and may come and go at any time. The table is filled from the
daemon's list whenever vLLM's layer looks for a name it does not hold (its runtime resolver
path, ``resolve_lora``) and whenever ``/v1/models`` is listed; loading and unloading register
and unregister with the daemon. The LoRA request vLLM's layer hands ``generate`` carries the
name only: the daemon resolves it again, so a name removed meanwhile is refused there.
"""

from __future__ import annotations

import itertools
from http import HTTPStatus
from typing import Any

from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve import create_error_response
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.lora.request import LoRARequest

from harli.http_proc.daemon_link import DaemonLink
from harli.http_proc.errors import ApiError
from harli.ipc.control import AddAdapter, ModelInfo, RemoveAdapter


class DaemonModels(OpenAIServingModels):
    link: DaemonLink
    _ids: dict[str, int]
    _next_id: Any

    @classmethod
    def adopt(cls, models: OpenAIServingModels, link: DaemonLink) -> DaemonModels:
        """Turn the instance vLLM's ``init_app_state`` built (and handed to every serving
        class) into this class, in place."""
        models.__class__ = cls
        adopted: DaemonModels = models  # type: ignore[assignment]
        adopted.link = link
        adopted._ids = {}
        adopted._next_id = itertools.count(1)
        return adopted

    async def sync(self) -> None:
        """The adapters the daemon registers now (lora ids stable per name here)."""
        adapters = {m.name: m.path for m in await self.link.models() if m.kind == "adapter"}
        self.lora_requests.clear()
        for name, path in adapters.items():
            lora_id = self._ids.setdefault(name, next(self._next_id))
            self.lora_requests[name] = LoRARequest(lora_name=name, lora_int_id=lora_id,
                                                   lora_path=path)

    async def show_available_models(self) -> Any:
        await self.sync()
        return await super().show_available_models()

    async def resolve_lora(self, lora_name: str) -> LoRARequest | ErrorResponse:
        await self.sync()
        found = self.lora_requests.get(lora_name)
        if found is not None:
            return found
        return create_error_response(message=f"The model `{lora_name}` does not exist.",
                                     err_type="NotFoundError",
                                     status_code=HTTPStatus.NOT_FOUND)

    async def load_lora_adapter(self, request: Any,
                                base_model_name: str | None = None) -> ErrorResponse | str:
        await self.sync()
        refused = await self._check_load_lora_adapter_request(request)
        if refused is not None:
            return refused
        if request.load_inplace:
            return create_error_response(
                message="load_inplace is not supported: register the new weights under a new "
                        "name", err_type="InvalidUserInput", status_code=HTTPStatus.BAD_REQUEST)
        try:
            await self.link.call(AddAdapter(name=request.lora_name, path=request.lora_path),
                                 ModelInfo)
        except ApiError as e:
            return _error_response(e)
        await self.sync()
        return f"Success: LoRA adapter '{request.lora_name}' added successfully."

    async def unload_lora_adapter(self, request: Any) -> ErrorResponse | str:
        await self.sync()
        refused = await self._check_unload_lora_adapter_request(request)
        if refused is not None:
            return refused
        try:
            await self.link.call(RemoveAdapter(name=request.lora_name), ModelInfo)
        except ApiError as e:
            return _error_response(e)
        self.lora_requests.pop(request.lora_name, None)
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."


def _error_response(e: ApiError) -> ErrorResponse:
    # vLLM answers a name already taken with 400; the daemon says conflict (409).
    status = HTTPStatus.BAD_REQUEST if e.status == 409 else HTTPStatus(e.status)
    return create_error_response(message=e.message, err_type=e.err_type, status_code=status)
