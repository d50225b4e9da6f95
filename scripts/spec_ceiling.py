"""What n-gram speculation can give at most on `scripts/bench_spec.py`'s one-stream prompts: tokens per step.

    python scripts/spec_ceiling.py --out spec-ceiling.json
    python scripts/spec_ceiling.py --prompts candidates.json   # {"workload": ["prompt", ...], ...} instead

Generates each prompt's greedy answer with the model alone (no server), then replays it through the engine's
own proposer (`llmctl.engine.speculative.ngram_draft`) as speculation would: at each step the drafts of the
context so far are checked against the answer, the agreeing prefix and one token more are taken. Greedy
speculation gives the model's own tokens, so this is exactly the tokens per verifying step that each
`--speculative-config` can reach when every draft is verified (the engine may verify fewer where they do not
pay). "best match" picks, at each step, whichever earlier occurrence of any suffix of 1 to 32 tokens would
be accepted furthest: no proposer that looks up the context can do better; "latest match" is the proposer
taking the latest occurrence of the longest suffix, without its majority rule. A step that verifies drafts
costs more than one that does not, so the speedup is below the tokens per step. The second table gives each
prompt's answer length and tokens per step with the benchmark's default config: a prompt whose answer the
model writes in its own words rather than copying gives little, whatever the proposer.
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
from bench_spec import DEFAULT_SPEC, FREE, REPEAT  # noqa: E402  (a script beside this one, not a package)

CONFIGS = [(5, 2, 4), (5, 1, 4), (8, 1, 4), (8, 1, 8), (8, 2, 8), (16, 1, 4)]  # (num_speculative_tokens, min, max)
# bench_spec.py's repeat prompts until SmolLM2-135M's answers were checked: it makes up most of the record's
# fields and of the function's body rather than copying them, so they show what speculation gives where an
# answer only partly repeats its prompt.
EARLIER_RECORD = ("order_id: 48213\ncustomer: Maria Gonzalez\nemail: maria.gonzalez@example.com\nitems: 3 x blue "
                  "widget, 1 x red gadget\nshipping: 12 Harbor Street, Portland, OR 97201\nstatus: shipped\n"
                  "total: 84.50 USD")
EARLIER_FUNCTION = '''def average(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)  # fails on an empty list
'''
EARLIER_REPEAT = [
    f"Copy the record below into a JSON object with the same keys and values.\n\n{EARLIER_RECORD}",
    "Fix this function so that it returns 0.0 for an empty list. Reply with the whole corrected function."
    f"\n\n{EARLIER_FUNCTION}",
    "Repeat this shopping list exactly, one item per line: apples, bread, milk, eggs, butter, cheese, rice, "
    "tomatoes, onions, garlic, olive oil, coffee.",
]


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


def ngram_rate(k: int, low: int, high: int, majority: bool = True):
    return lambda context, truth: accepted(ngram_draft(context, k, low, high, majority), truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--prompts", type=Path, default=None,
                        help='A JSON file {"workload": ["prompt", ...], ...} to measure instead of the benchmark\'s.')
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    workloads = (json.loads(args.prompts.read_text()) if args.prompts
                 else {"repeat": REPEAT, "free text": FREE, "earlier repeat": EARLIER_REPEAT})
    loaded = load_model(LoadOptions(model_path=args.model_path, dtype=args.dtype, device="cpu"))
    tokenizer, model = loaded.tokenizer, loaded.model
    eos = sorted(loaded.eos_token_ids)
    answers: dict[str, list[tuple[list[int], list[int]]]] = {workload: [] for workload in workloads}
    for workload, prompts in workloads.items():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=eos[0])
            answers[workload].append((ids[0].tolist(), out[0, ids.shape[1]:].tolist()))
    spec = json.loads(DEFAULT_SPEC)
    default = (spec["num_speculative_tokens"], spec["prompt_lookup_min"], spec["prompt_lookup_max"])
    rows = [(config_name(*config), ngram_rate(*config)) for config in dict.fromkeys([*CONFIGS, default])]
    rows.append((f"{config_name(*default)}, latest match", ngram_rate(*default, majority=False)))
    rows.append(("best match, 8 tokens", lambda context, truth: best_match(context, truth, 8)))
    title = f"greedy answers of {loaded.name} ({args.dtype}), {args.max_tokens} tokens at most, replayed"
    table = Table(title=f"Tokens per verifying step, {title}")
    table.add_column("proposer")
    for workload in answers:
        table.add_column(workload, justify="right")
    # Each proposer's verifying steps on each answer, replayed once for both tables.
    counted = {name: {workload: [steps(prompt, answer, propose) for prompt, answer in pairs]
                      for workload, pairs in answers.items()} for name, propose in rows}
    summary: dict = {}
    for name, by_workload in counted.items():
        rates = {workload: sum(len(answer) for _, answer in answers[workload]) / sum(counts)
                 for workload, counts in by_workload.items()}
        summary[name] = rates
        table.add_row(name, *(f"{rate:.2f}" for rate in rates.values()))
    per_prompt = Table(title=f"Each prompt, {config_name(*default)} (the benchmark's default) and best match")
    for column in ("workload", "prompt", "answer tokens", "default", "best match"):
        per_prompt.add_column(column, justify="left" if column in ("workload", "prompt") else "right")
    summary["prompts"] = []
    for workload, pairs in answers.items():
        default_steps, best_steps = counted[config_name(*default)][workload], counted[rows[-1][0]][workload]
        for i, (prompt, (_, answer)) in enumerate(zip(workloads[workload], pairs, strict=True)):
            rate, best = len(answer) / default_steps[i], len(answer) / best_steps[i]
            per_prompt.add_row(workload, prompt[:48].replace("\n", " ") + "...", str(len(answer)), f"{rate:.2f}",
                               f"{best:.2f}")
            summary["prompts"].append({"workload": workload, "prompt": prompt, "answer": tokenizer.decode(answer),
                                       "answer_tokens": len(answer), "default": rate, "best_match": best})
    console = Console(width=140)
    console.print(table)
    console.print(per_prompt)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


def config_name(k: int, low: int, high: int) -> str:
    return f'{{"num_speculative_tokens": {k}, "prompt_lookup_min": {low}, "prompt_lookup_max": {high}}}'


if __name__ == "__main__":
    main()
