"""Raw in-process `model.generate` throughput at fixed batch sizes: the baseline a server is measured against."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmctl.bench.prompts import Messages
from llmctl.core.loader import Device, Dtype, LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineLevel:
    """Greedy `generate` of left-padded batches of ``batch_size`` prompts, each to exactly max_tokens tokens."""

    batch_size: int
    requests: int
    batches: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    prompt_tokens: int
    completion_tokens: int
    batch_latency_ms: float


def chat_texts(tokenizer, prompts: Sequence[Messages]) -> list[str]:
    """Render prompts with the chat template, exactly as llmctl's server does before tokenizing."""
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]


def generate_batch(loaded: LoadedModel, texts: Sequence[str], max_tokens: int) -> tuple[int, int]:
    """Generate ``max_tokens`` tokens greedily for each text in one batch; (prompt tokens, new tokens)."""
    import torch

    tokenizer = loaded.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    enc = {k: v.to(loaded.input_device) for k, v in enc.items()}
    with torch.inference_mode():
        out = loaded.model.generate(
            **enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
            temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
        )
    if loaded.input_device.type == "cuda":
        torch.cuda.synchronize()
    width = enc["input_ids"].shape[1]
    return int(enc["attention_mask"].sum()), int(out.shape[0] * (out.shape[1] - width))


def run_offline(loaded: LoadedModel, prompts: Sequence[Messages], batch_sizes: Sequence[int], max_tokens: int,
                requests_for: Callable[[int], int], warmup: bool = True, first_prompts: Sequence[int] = (),
                progress: Callable[[int, int, int], None] | None = None,
                done: list[OfflineLevel] | None = None) -> list[OfflineLevel]:
    """Measure each batch size over ``requests_for(batch_size)`` prompts (rounded up to whole batches).

    Level k's request i uses prompts[(first_prompts[k] + i) % len(prompts)] (``first_prompts``
    defaults to 0 for every level), as in the server benchmark, so both see the same workload.
    With ``warmup``, one uncounted batch of each size runs first.
    ``progress(batch_size, done, total)`` is called after each batch. Finished levels are appended
    to ``done`` (returned), so a caller interrupted by Ctrl-C still holds them.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generation-config notes about unused sampling flags
    rendered: dict[int, str] = {}

    def text(i: int) -> str:
        i %= len(prompts)
        if i not in rendered:
            rendered[i] = chat_texts(loaded.tokenizer, [prompts[i]])[0]
        return rendered[i]

    levels = done if done is not None else []
    for k, size in enumerate(batch_sizes):
        first = first_prompts[k] if k < len(first_prompts) else 0
        wanted = max(size, requests_for(size))
        batches = -(-wanted // size)
        total = batches * size
        if warmup:  # the first batch of a new shape pays for kernel selection and allocator growth
            generate_batch(loaded, [text(first + j) for j in range(size)], min(max_tokens, 16))
        prompt_tokens = new_tokens = 0
        started = time.perf_counter()
        for b in range(batches):
            batch = [text(first + b * size + j) for j in range(size)]
            p, n = generate_batch(loaded, batch, max_tokens)
            prompt_tokens, new_tokens = prompt_tokens + p, new_tokens + n
            if progress is not None:
                progress(size, (b + 1) * size, total)
        duration = time.perf_counter() - started
        levels.append(OfflineLevel(
            batch_size=size, requests=total, batches=batches, duration_s=duration,
            request_throughput=total / duration, output_throughput=new_tokens / duration,
            total_token_throughput=(prompt_tokens + new_tokens) / duration,
            prompt_tokens=prompt_tokens, completion_tokens=new_tokens,
            batch_latency_ms=duration / batches * 1000.0,
        ))
        log.info("offline batch %d: %.1f output tok/s", size, new_tokens / duration)
    return levels


@dataclass
class OfflineRun:
    """Every batch size measured for one model, and how it was loaded."""

    model: str
    dtype: str
    device: str
    levels: list[OfflineLevel]


def load_offline_model(model_path: Path | None, dtype: Dtype = "auto", device: Device = "auto") -> LoadedModel:
    """Load a model for the offline baseline; ``model_path`` None means the embedded SmolLM2."""
    from transformers.utils import logging as hf_logging

    from llmctl.core.loader import LoadOptions, load_model

    hf_logging.disable_progress_bar()
    return load_model(LoadOptions(model_path=model_path, dtype=dtype, device=device))
