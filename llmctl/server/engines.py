"""The engines `llmctl serve` can run, by name. Each entry loads what its engine needs and builds it;
the service only ever sees the `llmctl.engine.Engine` protocol. A new engine is one module in
llmctl/engine/ and one entry here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmctl.core.loader import LoadedModel, LoadOptions
from llmctl.engine import BuiltinEngine, Engine, EngineConfig

Loader = Callable[[LoadOptions], LoadedModel]
# (load options, engine bounds, model loader, the engine's own options or None) -> (model, engine)
EngineFactory = Callable[[LoadOptions, EngineConfig, Loader, Any], tuple[LoadedModel, Engine]]


def builtin_engine(load: LoadOptions, config: EngineConfig, loader: Loader,
                   options: None = None) -> tuple[LoadedModel, Engine]:
    """llmctl's own continuous batching over a transformers model loaded in this process."""
    loaded = loader(load)
    return loaded, BuiltinEngine(loaded.model, loaded.eos_token_ids, config, tokenizer=loaded.tokenizer)


def vllm_engine(load: LoadOptions, config: EngineConfig, loader: Loader,
                options: Any = None) -> tuple[LoadedModel, Engine]:
    """vLLM's engine in this process: llmctl loads the tokenizer, vLLM the weights (``options``: VllmOptions)."""
    from llmctl.engine.vllm import VllmEngine
    from llmctl.engine.vllm_setup import VllmOptions, describe_model, preflight

    options = options or VllmOptions()
    preflight(load, options)
    loaded, model = describe_model(load, config)
    return loaded, VllmEngine(model, options, loaded.eos_token_ids, config)


ENGINES: dict[str, EngineFactory] = {"builtin": builtin_engine, "vllm": vllm_engine}
