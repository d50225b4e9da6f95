"""The builtin engine's own `llmctl serve` options, its preflight and how it is built (torch is imported
only by `build`, so the flags are checked before it loads)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Literal, get_args

from llmctl.core import speculation
from llmctl.core.loader import LoadOptions
from llmctl.core.loader import preflight as load_preflight

if TYPE_CHECKING:
    from llmctl.core.loader import LoadedModel
    from llmctl.core.speculation import SpeculativeConfig
    from llmctl.core.threads import ThreadPolicy
    from llmctl.engine.base import Engine, EngineConfig, Loader

Attention = Literal["auto", "grouped", "transformers"]  # see llmctl.engine.attention.select


@dataclass(frozen=True)
class BuiltinOptions:
    """The flags only the builtin engine honours (the shared ones come from LoadOptions and EngineConfig)."""

    title: ClassVar[str] = "the builtin engine"

    attention: Attention = "auto"
    # Most prompt tokens in one prefill pass (a step may run several, up to max_batched_tokens); None: the
    # engine's choice for the device (see Prefills.prefill_pass_tokens).
    max_prefill_tokens: int | None = None
    # How long an idle engine waits for the rest of a burst of requests before it prefills (ms); None: the
    # engine's choice for the device (see Prefills.prefill_wait_s).
    prefill_wait_ms: float | None = None
    # Compute each request as if it ran alone (prefills one at a time, each decode row a pass of its own, no
    # shared prefixes): its tokens do not depend on the other requests in its batch (llmctl.engine.reproducible).
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be at least 1")
        if self.prefill_wait_ms is not None and not 0 <= self.prefill_wait_ms <= 1000:
            raise ValueError("prefill_wait_ms must be between 0 and 1000")
        if self.attention not in get_args(Attention):
            raise ValueError(f"attention must be one of {', '.join(get_args(Attention))}")

    def speculative(self, text: str) -> SpeculativeConfig:
        """Only the keys and methods this engine implements, and a draft model's folder that is there."""
        config = speculation.parse(text, strict=True)
        speculation.check_draft_path(config)
        return config

    def compute_note(self, threads: ThreadPolicy) -> str | None:
        # The engine runs torch on this process's threads: its tuner picks the count unless it is fixed.
        return threads.describe() + ("" if threads.fixed else " (--cpu-threads N to fix the count)")

    def preflight(self, load: LoadOptions) -> None:
        load_preflight(load)

    def build(self, load: LoadOptions, config: EngineConfig, loader: Loader) -> tuple[LoadedModel, Engine]:
        """llmctl's own continuous batching over a transformers model loaded in this process."""
        from llmctl.core.threads import tuner
        from llmctl.engine.builtin import BuiltinEngine

        loaded = loader(load)
        return loaded, BuiltinEngine(loaded.model, loaded.eos_token_ids, config, tokenizer=loaded.tokenizer,
                                     options=self, draft_model=_draft_model(load, config, loader, loaded),
                                     threads=tuner() if loaded.device == "cpu" else None)


def _draft_model(load: LoadOptions, config: EngineConfig, loader: Loader, served: LoadedModel):
    """The draft model of `--speculative-config`'s draft_model method, loaded as the served model is (dtype,
    device); ModelLoadError when its tokenizer is another."""
    spec = config.speculative
    if spec is None or spec.model is None:
        return None
    from llmctl.engine.draft import check_same_tokenizer

    draft = loader(replace(load, model_path=spec.model, served_model_name=None, max_model_len=None))
    check_same_tokenizer(served.tokenizer, draft.tokenizer, str(spec.model))
    return draft.model
