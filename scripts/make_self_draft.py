"""A draft model for `--speculative-config`'s draft_model method cut from the served model itself (layer skip).

    python scripts/make_self_draft.py --layers 8 --out /tmp/smollm2-draft-8
    python scripts/bench_spec.py --speculative-config '{"model": "/tmp/smollm2-draft-8", "num_speculative_tokens": 4}'

Keeps the model's first ``--layers`` decoder layers with its own embeddings, final norm and head (the same
tokenizer, so `serve` accepts it as a draft), and saves it with the tokenizer as a model folder. No training:
the hidden state after a few layers is read by a head made for the last layer's, so its greedy token agrees
with the full model's only now and then; the engine's per-step check of what drafts pay decides whether it is
used at all (docs/benchmarks.md has the figure).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llmctl.core.loader import LoadOptions, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=8, help="Decoder layers kept, from the first.")
    parser.add_argument("--out", type=Path, required=True, help="The draft model's folder (created).")
    args = parser.parse_args()
    loaded = load_model(LoadOptions(model_path=args.model_path, dtype=args.dtype, device="cpu"))
    model = loaded.model
    total = model.config.num_hidden_layers
    if not 1 <= args.layers < total:
        raise SystemExit(f"--layers must be between 1 and {total - 1} (the model has {total})")
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:args.layers])
    model.config.num_hidden_layers = args.layers
    if getattr(model.config, "layer_types", None):  # per-layer attention kinds, where the config lists them
        model.config.layer_types = model.config.layer_types[:args.layers]
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    loaded.tokenizer.save_pretrained(args.out)
    kept = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {loaded.name}'s first {args.layers} of {total} layers, {kept / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
