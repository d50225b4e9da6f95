"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter, with vLLM's request bodies: LoRA adapters served
(and dropped) at run time, each a model of its own in /v1/models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, StrictInt, StrictStr

from llmctl.core.adapters import NAME_PATTERN, AdapterError, AdapterSpec
from llmctl.errors import InvalidRequest
from llmctl.server.api.validation import Lenient, Strict, parse_body

if TYPE_CHECKING:
    from llmctl.server.loras import Loras
    from llmctl.server.service import Service


class LoadLoraAdapterRequest(Lenient):
    """A PEFT adapter folder (adapter_config.json, adapter_model.safetensors) on the server's disk, for the
    served base model; ``lora_name`` becomes the model name requests use."""

    lora_name: Annotated[StrictStr, Field(pattern=f"^{NAME_PATTERN.pattern}$")]
    lora_path: Annotated[StrictStr, Field(min_length=1)]


class UnloadLoraAdapterRequest(Lenient):
    """Requests already running with the adapter finish first; new ones get 404 at once."""

    lora_name: Annotated[StrictStr, Field(pattern=f"^{NAME_PATTERN.pattern}$")]
    lora_int_id: StrictInt | None = None  # vLLM's; llmctl names adapters only


class LoraAdapter(Strict):
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter: the adapter; ``message`` is vLLM's answer text."""

    object: Literal["lora_adapter"]
    id: str
    parent: str | None = None
    rank: int | None = None
    running_requests: int | None = None
    message: str


ANSWERS = (LoraAdapter,)


def _loras(service: Service) -> Loras:
    service.require_ready()
    if service.loras is None:
        raise InvalidRequest("This server does not serve LoRA adapters; start it with --lora NAME=PATH or "
                             "--enable-lora.", param="lora_name", code="lora_disabled")
    return service.loras


def load(service: Service, body: object) -> dict:
    """Load an adapter: 400 naming lora_name or lora_path when it cannot be served; the server keeps serving."""
    req = parse_body(LoadLoraAdapterRequest, body)
    loras = _loras(service)
    try:
        spec = AdapterSpec.checked(req.lora_name, Path(req.lora_path))
    except AdapterError as exc:
        raise InvalidRequest(exc.message, param="lora_name") from None
    info = loras.add(spec, request=True)
    return LoraAdapter(object="lora_adapter", id=info.name, parent=loras.base, rank=info.rank,
                       message=f"Success: LoRA adapter '{info.name}' added successfully.").model_dump()


def unload(service: Service, body: object) -> dict:
    """Unload an adapter: new requests naming it get 404 now; its weights go when its running requests end."""
    req = parse_body(UnloadLoraAdapterRequest, body)
    running = _loras(service).remove(req.lora_name)
    return LoraAdapter(object="lora_adapter", id=req.lora_name, running_requests=running,
                       message=f"Success: LoRA adapter '{req.lora_name}' removed successfully.").model_dump()
