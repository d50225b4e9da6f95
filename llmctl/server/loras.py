"""The LoRA adapters a server serves as models of their own: which names resolve to which adapter, how many
requests use each, and loading and unloading them at run time (vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter). An unloaded adapter takes no new request at once; its weights go when the last
request that uses it ends."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

from llmctl.core.adapters import AdapterError, AdapterInfo, AdapterSpec, read_adapter
from llmctl.errors import InvalidRequest, ModelNotFound

log = logging.getLogger(__name__)


class AdapterHost(Protocol):
    """What an engine offers to hold adapters (`llmctl.engine.lora.LoraSet` for the builtin engine)."""

    max_loras: int
    max_rank: int

    def add(self, info: AdapterInfo) -> object:
        """Load ``info``'s weights; raise AdapterError when they do not fit the model."""

    def remove(self, name: str) -> None:
        """Drop ``name``'s weights (no request uses it any more)."""

    @property
    def nbytes(self) -> int:
        """Memory the resident adapters take."""


@dataclass
class _Served:
    info: AdapterInfo
    users: int = 0
    unloading: bool = False


class Loras:
    """The served adapters of one service, thread-safe (HTTP workers resolve, acquire and release)."""

    def __init__(self, host: AdapterHost, base: str) -> None:
        self.host = host
        self.base = base  # the base model's served name: the adapters' parent
        self._served: dict[str, _Served] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The adapters requests may name now (not those being unloaded)."""
        with self._lock:
            return [name for name, s in self._served.items() if not s.unloading]

    def adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return [s.info for s in self._served.values() if not s.unloading]

    def __contains__(self, name: str) -> bool:
        with self._lock:
            served = self._served.get(name)
            return served is not None and not served.unloading

    def add(self, spec: AdapterSpec, request: bool = False) -> AdapterInfo:
        """Check and load an adapter. ``request``: a failure is a 400 naming the field at fault (lora_name or
        lora_path); else (at start-up) the AdapterError it is."""
        field = "lora_name"
        try:
            if spec.name == self.base:
                raise AdapterError(f"LoRA adapter name '{spec.name}' is the base model's name; choose another.")
            with self._lock:
                if spec.name in self._served:
                    raise AdapterError(f"LoRA adapter '{spec.name}' is already loaded; unload it first.")
            field = "lora_path"
            info = read_adapter(spec, self.host.max_rank)
            with self._lock:  # two loads of one name at once: the second is refused before it costs memory
                if spec.name in self._served:
                    field = "lora_name"
                    raise AdapterError(f"LoRA adapter '{spec.name}' is already loaded; unload it first.")
                self._served[spec.name] = _Served(info, unloading=True)
            try:
                self.host.add(info)
            except BaseException:
                with self._lock:
                    self._served.pop(spec.name, None)
                raise
            with self._lock:
                self._served[spec.name].unloading = False
            return info
        except AdapterError as exc:
            if not request:
                raise
            raise InvalidRequest(exc.message, param=field) from None

    def acquire(self, name: str) -> None:
        """A request starts using ``name``: it stays loaded until `release`. 404 when it is not served."""
        with self._lock:
            served = self._served.get(name)
            if served is None or served.unloading:
                raise self.not_found(name)
            served.users += 1

    def release(self, name: str) -> None:
        with self._lock:
            served = self._served[name]
            served.users -= 1
            gone = served.unloading and not served.users
            if gone:
                del self._served[name]
        if gone:
            self.host.remove(name)

    def remove(self, name: str) -> int:
        """Unload ``name``: no new request may use it; its weights go now, or when its last request ends.
        Returns the requests still using it."""
        with self._lock:
            served = self._served.get(name)
            if served is None or served.unloading:
                raise InvalidRequest(f"LoRA adapter '{name}' is not loaded.", param="lora_name", code="not_found")
            served.unloading = True
            users = served.users
            if not users:
                del self._served[name]
        if not users:
            self.host.remove(name)
        else:
            log.info("LoRA adapter '%s' unloads when its %d running request(s) end", name, users)
        return users

    def not_found(self, name: str) -> ModelNotFound:
        served = ", ".join([self.base, *self.names()])
        return ModelNotFound(f"The model '{name}' does not exist; this server serves: {served}.", param="model")

