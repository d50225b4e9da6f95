"""GET /v1/models, /health, /get_load and /get_model_info: the served models and the server's state, and their
answer models (the OpenAPI document's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from llmctl import __version__
from llmctl.core import hardware
from llmctl.core.threads import policy as thread_policy
from llmctl.server.api.validation import Strict
from llmctl.server.context import not_found
from llmctl.server.service import Status

if TYPE_CHECKING:
    from llmctl.server.service import Service


class Model(Strict):
    """A served model: the base model, or a LoRA adapter (with its base model as ``parent`` and its folder as
    ``root``, as vLLM lists them)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None


class ModelList(Strict):
    object: Literal["list"]
    data: list[Model]


class LoraAdapters(Strict):
    """The LoRA adapters served: their names, how many may be loaded at once, and their weights' memory."""

    loaded: list[str]
    max_loras: int
    max_lora_rank: int
    memory_bytes: int


class Health(Strict):
    """GET /health: 200 when ready, 503 otherwise. Fields are null until the model has loaded."""

    status: Status
    model: str | None
    device: str | None
    cpu_threads: int
    cpu_threads_policy: Literal["adaptive", "fixed"]
    cuda_available: bool
    cuda_device_count: int
    memory_allocated_gb: float
    memory_reserved_gb: float
    dtype: str | None
    quantization: Literal["none", "8bit", "4bit"] | None
    context_length: int | None
    running: int
    waiting: int
    lora_adapters: LoraAdapters | None = None  # null when the server does not serve LoRA adapters
    version: str
    speculative: dict[str, Any] | None = Field(
        default=None, description="The --speculative-config in effect, as given; absent when speculation is off.")
    error: str | None = None


class WorkerLoad(Strict):
    """GET /get_load: the sequences this replica holds, as request routers (vLLM's, SGLang's) poll it."""

    load: int
    running: int
    waiting: int


class ModelInfo(Strict):
    """GET /get_model_info: the served model in SGLang's shape, which request routers pass through."""

    model_path: str
    tokenizer_path: str
    is_generation: bool
    served_model_name: str
    context_length: int


OWNER = "llmctl"  # every model's owned_by
ANSWERS = (Model, ModelList, Health, WorkerLoad, ModelInfo)


def models(service: Service) -> dict:
    """/v1/models: the base model, then each LoRA adapter it serves (its base model as ``parent``, as vLLM's)."""
    loaded, _ = service.require_ready()
    adapters = service.loras.adapters() if service.loras else []
    data = [Model(id=loaded.name, object="model", created=service.created, owned_by=OWNER)]
    data += [Model(id=a.name, object="model", created=service.created, owned_by=OWNER, parent=loaded.name,
                   root=str(a.path)) for a in adapters]
    return ModelList(object="list", data=data).model_dump()


def model(service: Service, model_id: str) -> dict:
    """/v1/models/{model}: one served model; 404 for another name."""
    listed = models(service)["data"]
    for card in listed:
        if card["id"] == model_id:
            return card
    raise not_found(model_id, listed[0]["id"], service.loras)


def health(service: Service) -> tuple[dict, int]:
    """/health's body and status: 200 when ready, 503 otherwise."""
    gpu = hardware.gpu_memory()
    status: Status = "shutting_down" if service.draining else service.status
    loaded, engine = service.loaded, service.engine
    lora = service.lora_summary()
    answer = Health(
        status=status, model=loaded.name if loaded else None, device=loaded.device if loaded else None,
        **thread_policy().report(), cuda_available=hardware.torch_cuda_available(),
        cuda_device_count=hardware.cuda_device_count(), memory_allocated_gb=round(gpu.allocated_gb, 3),
        memory_reserved_gb=round(gpu.reserved_gb, 3), dtype=loaded.dtype if loaded else None,
        quantization=loaded.quantization if loaded else None,
        context_length=loaded.context_length if loaded else None,
        running=engine.running if engine else 0, waiting=engine.waiting if engine else 0,
        lora_adapters=LoraAdapters(**lora) if lora is not None else None, version=__version__)
    speculative = service.settings.engine.speculative
    if speculative is not None:
        answer.speculative = speculative.as_dict()
    if service.error:
        answer.error = service.error
    return answer.model_dump(), 200 if status == "ready" else 503


def load(service: Service) -> dict:
    """/get_load: running plus waiting sequences, what a router's load-aware policies compare across replicas."""
    running = service.engine.running if service.engine else 0
    waiting = service.engine.waiting if service.engine else 0
    return WorkerLoad(load=running + waiting, running=running, waiting=waiting).model_dump()


def model_info(service: Service) -> dict:
    """/get_model_info: the served model in SGLang's shape."""
    loaded, _ = service.require_ready()
    # The name clients send as "model" (never a local file path): what a router groups replicas by.
    return ModelInfo(model_path=loaded.name, tokenizer_path=loaded.name, is_generation=True,
                     served_model_name=loaded.name, context_length=loaded.context_length).model_dump()
