"""The engines `llmctl serve` can run, by name. Each entry loads what its engine needs and builds it;
the service only ever sees the `llmctl.engine.Engine` protocol. A new engine is one module in
llmctl/engine/ and one entry here."""

from __future__ import annotations

from collections.abc import Callable

from llmctl.core.loader import LoadedModel, LoadOptions
from llmctl.engine import BuiltinEngine, Engine, EngineConfig

Loader = Callable[[LoadOptions], LoadedModel]
EngineFactory = Callable[[LoadOptions, EngineConfig, Loader], tuple[LoadedModel, Engine]]


def builtin_engine(load: LoadOptions, config: EngineConfig, loader: Loader) -> tuple[LoadedModel, Engine]:
    """llmctl's own continuous batching over a transformers model loaded in this process."""
    loaded = loader(load)
    return loaded, BuiltinEngine(loaded.model, loaded.eos_token_ids, config)


ENGINES: dict[str, EngineFactory] = {"builtin": builtin_engine}
