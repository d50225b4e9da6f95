"""LoRA adapters on vLLM's engine: the adapters llmctl serves, as the `LoRARequest` each of their requests carries."""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path

from llmctl.core.adapters import AdapterError, AdapterInfo, check_fits, folder_linear_shapes


class VllmAdapters:
    """The LoRA adapters vLLM serves (`llmctl.server.loras.AdapterHost`): each is a `LoRARequest` that goes with its
    requests (vLLM loads it on first use and keeps up to ``max_loras`` in its cache); an unloaded one is removed
    from vLLM on the engine thread before its next step."""

    # vLLM's max_lora_rank takes these values only: the operator's bound is rounded up to one.
    VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

    def __init__(self, max_loras: int, max_rank: int, folder: Path) -> None:
        self.max_loras, self.max_rank, self.folder = max_loras, max_rank, folder
        self._adapters: dict[str, tuple[int, AdapterInfo]] = {}
        self._removed: deque[int] = deque()
        self._ids = itertools.count(1)
        self._shapes: dict | None = None

    def engine_args(self) -> dict:
        rank = next((r for r in self.VLLM_RANKS if r >= self.max_rank), self.VLLM_RANKS[-1])
        return {"enable_lora": True, "max_loras": self.max_loras, "max_cpu_loras": self.max_loras,
                "max_lora_rank": rank}

    @property
    def nbytes(self) -> int:
        return sum(info.weights_bytes for _, info in list(self._adapters.values()))

    def add(self, info: AdapterInfo) -> None:
        if self._shapes is None:
            self._shapes = folder_linear_shapes(self.folder) or {}
        if self._shapes:
            check_fits(info, self._shapes, "the served model")
        if len(self._adapters) >= self.max_loras:
            raise AdapterError(f"LoRA adapter '{info.name}': {self.max_loras} adapters are loaded already "
                               "(--max-loras); unload one first.")
        self._adapters[info.name] = (next(self._ids), info)

    def remove(self, name: str) -> None:
        found = self._adapters.pop(name, None)
        if found is not None:
            self._removed.append(found[0])

    def take_removed(self) -> list[int]:
        removed = []
        while self._removed:
            removed.append(self._removed.popleft())
        return removed

    def request(self, name: str | None):
        """vLLM's LoRARequest for adapter ``name`` (None: the base model, or an adapter unloaded meanwhile)."""
        found = self._adapters.get(name) if name else None
        if found is None:
            return None
        from vllm.lora.request import LoRARequest

        lora_id, info = found
        return LoRARequest(info.name, lora_id, str(info.path))
