"""The generation engines behind the server, and the interface they share (`base.Engine`).

`builtin` is llmctl's own continuous-batching engine over a transformers model (with `batch` for its
KV-cache layout); `sampling` turns logits into tokens; `text` turns tokens back into text. Each engine's
options live in a module that does not import torch (`builtin_setup`, `vllm_setup`), so this package
loads its names on first use: `llmctl serve` checks its flags before torch is imported.

May import: llmctl.core, llmctl.errors, llmctl.envvars. Never the server, the client or the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmctl.engine.base import Engine, EngineConfig, EngineStats, Finish, Sequence
    from llmctl.engine.builtin import BuiltinEngine
    from llmctl.engine.sampling import SamplingParams

_HOMES = {"Engine": "base", "EngineConfig": "base", "EngineStats": "base", "Finish": "base", "Sequence": "base",
          "BuiltinEngine": "builtin", "SamplingParams": "sampling"}
__all__ = ["BuiltinEngine", "Engine", "EngineConfig", "EngineStats", "Finish", "SamplingParams", "Sequence"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
