"""The generation engines behind the server, and the interface they share (`base.Engine`).

`builtin` is llmctl's own continuous-batching engine over a transformers model (with `batch` for its
KV-cache layout); `sampling` turns logits into tokens; `text` turns tokens back into text.

May import: llmctl.core, llmctl.errors, llmctl.envvars. Never the server, the client or the CLI.
"""

from llmctl.engine.base import Engine, EngineConfig, EngineStats, Finish, Sequence
from llmctl.engine.builtin import BuiltinEngine
from llmctl.engine.sampling import SamplingParams

__all__ = ["BuiltinEngine", "Engine", "EngineConfig", "EngineStats", "Finish", "SamplingParams", "Sequence"]
