"""Helpers for tests and benchmarks: a tiny random chat model built locally, and an in-process server.

The tiny model has the shape of a real Llama chat model (ChatML template, <|im_end|> as end of
sequence) but a few hundred thousand parameters, so it loads and generates in milliseconds.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello! How can I help you today? Count to five: one two three four five.",
    "A quick brown fox jumps over the lazy dog while the sea is calm and blue.",
    "system user assistant tool messages tokens stream chat model server request.",
    "0123456789 !?.,;:-_()[]{}'\"/\\@#$%^&*+=<>|~` éàüß 你好",
]


def build_tiny_model(folder: Path, *, vocab_size: int = 512, context: int = 256, layers: int = 2,
                     hidden: int = 64, seed: int = 0, chat_template: bool = True, init_std: float = 0.2,
                     extra_specials: tuple[str, ...] = (), intermediate: int | None = None) -> Path:
    """Write a tiny random Llama chat model (config, safetensors, tokenizer) to ``folder`` (``extra_specials``:
    more special tokens in its vocabulary, e.g. a reasoning model's ``<think>`` and ``</think>``;
    ``intermediate``: the MLP's width, twice ``hidden`` by default)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_specials]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=specials,
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(service, *, threads: int = 48, limits=None, **http_options) -> Iterator[str]:
    """Serve ``service`` with waitress (guarded as `llmctl serve` does) on 127.0.0.1 in this process; yields
    the base URL.

    ``limits`` is a `llmctl.server.transport.TransportLimits`; ``http_options`` are the fields of
    `llmctl.server.app.HTTPOptions` (api_keys, allowed_origins, ...).
    """
    from llmctl.server.app import HTTPOptions, create_app
    from llmctl.server.runner import transport_body_limit
    from llmctl.server.transport import TransportLimits, create_guarded_server

    app = create_app(service, HTTPOptions(**http_options))
    server = create_guarded_server(app, "127.0.0.1", 0, threads, limits or TransportLimits(),
                                   transport_body_limit(app))
    port = server.socket.getsockname()[1]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
