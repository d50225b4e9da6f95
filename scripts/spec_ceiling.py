"""What n-gram speculation can give at most on `scripts/bench_spec.py`'s one-stream prompts: tokens per step.

    python scripts/spec_ceiling.py --out spec-ceiling.json

Generates each prompt's greedy answer with the model alone (no server), then replays it through the engine's
own proposer (`llmctl.engine.speculative.ngram_draft`) as speculation would: at each step the drafts of the
context so far are checked against the answer, the agreeing prefix and one token more are taken. Greedy
speculation gives the model's own tokens, so this is exactly the tokens per verifying step that each
`--speculative-config` can reach when every draft is verified (the engine may verify fewer where they do not
pay). "best match" picks, at each step, whichever earlier occurrence of any suffix of 1 to 32 tokens would
be accepted furthest: no proposer that looks up the context can do better. A step that verifies drafts
costs more than one that does not, so the speedup is below the tokens per step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from llmctl.core.loader import LoadOptions, load_model
from llmctl.engine.speculative import ngram_draft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_spec import FREE, REPEAT  # noqa: E402  (a script beside this one, not a package)

CONFIGS = [(5, 2, 4), (5, 1, 4), (8, 1, 4), (8, 2, 8), (16, 1, 4)]  # (num_speculative_tokens, min, max)


def accepted(draft: list[int], truth: list[int]) -> int:
    n = 0
    while n < len(draft) and n < len(truth) and draft[n] == truth[n]:
        n += 1
    return n


def best_match(context: list[int], truth: list[int], k: int) -> int:
    """The most any earlier occurrence of a suffix (1 to 32 tokens) of ``context`` would have accepted."""
    tokens = np.asarray(context)
    length, best = len(tokens), 0
    for n in range(1, min(32, length - 1) + 1):
        hits = tokens[:length - n] == tokens[length - n]
        for t in range(1, n):
            hits &= tokens[t:length - n + t] == tokens[length - n + t]
        found = np.flatnonzero(hits)
        if not len(found):
            break  # a longer suffix cannot occur where a shorter one does not
        best = max([best] + [accepted(tokens[i + n:i + n + k].tolist(), truth) for i in found])
    return best


def steps(prompt: list[int], answer: list[int], propose) -> int:
    done = count = 0
    while done < len(answer):
        done += propose(prompt + answer[:done], answer[done:]) + 1
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    loaded = load_model(LoadOptions(model_path=args.model_path, dtype=args.dtype, device="cpu"))
    tokenizer, model = loaded.tokenizer, loaded.model
    answers: dict[str, list[tuple[list[int], list[int]]]] = {"repeat": [], "free text": []}
    for workload, prompts in (("repeat", REPEAT), ("free text", FREE)):
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            eos = sorted(loaded.eos_token_ids)
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=eos[0])
            answers[workload].append((ids[0].tolist(), out[0, ids.shape[1]:].tolist()))
    rows = [(f'{{"num_speculative_tokens": {k}, "prompt_lookup_min": {low}, "prompt_lookup_max": {high}}}',
             lambda k=k, low=low, high=high: lambda context, truth: accepted(ngram_draft(context, k, low, high), truth))
            for k, low, high in CONFIGS]
    rows.append(("best match, 8 tokens", lambda: lambda context, truth: best_match(context, truth, 8)))
    table = Table(title=f"Tokens per verifying step, greedy answers of {loaded.name} ({args.dtype}) replayed")
    table.add_column("proposer")
    for workload in answers:
        table.add_column(workload, justify="right")
    summary = {}
    for name, make in rows:
        rates = {}
        for workload, pairs in answers.items():
            tokens = sum(len(answer) for _, answer in pairs)
            rates[workload] = tokens / sum(steps(prompt, answer, make()) for prompt, answer in pairs)
        summary[name] = rates
        table.add_row(name, *(f"{rate:.2f}" for rate in rates.values()))
    Console(width=140).print(table)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
