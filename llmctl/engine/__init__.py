"""The generation engine: continuous batching over the model's forward pass and KV cache."""

from llmctl.engine.engine import Engine, EngineConfig, Finish, Sequence
from llmctl.engine.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "Finish", "SamplingParams", "Sequence"]
