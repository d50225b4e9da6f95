"""What validating each new grammar in a capped worker process costs the first request with that grammar.

For one tokenizer (default: the embedded SmolLM2's), it compiles fresh constraints (each one new,
so nothing is cached) through `Grammars.matcher` as the server does, alternately with the sandbox
(the shipped path: limits, then validation in a worker, then the compile with the tokenizer) and
without it (limits, then the compile only), and prints the median time of each and their ratio,
per kind of constraint. The worker's start (once per server, or after a worker was lost) is
timed apart.

    python scripts/bench_grammar_sandbox.py [--model-path DIR] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from llmctl.engine import structured
from llmctl.engine.grammar_sandbox import CompileSandbox
from llmctl.engine.structured import Constraint, Grammars

TOOLS = {"type": "object", "properties": {
    f"field_{i}": {"type": "string", "description": "what this field holds " * 8, "maxLength": 100}
    for i in range(200)}}


def constraint(kind: str, i: int) -> Constraint:
    """A constraint of ``kind`` that no earlier call made (a new schema, regex or list each time)."""
    if kind == "small schema":
        return Constraint.json_schema({"type": "object", "properties": {f"name_{i}": {"type": "string"},
                                                                        "n": {"type": "integer"}},
                                       "required": [f"name_{i}"], "additionalProperties": False})
    if kind == "200-field schema":
        return Constraint.json_schema({**TOOLS, "required": [f"field_{i % 200}"]})
    if kind == "regex":
        return Constraint("regex", rf"[a-z]{{2,{8 + i}}}-\d{{1,4}}")
    return Constraint("choice", json.dumps([f"option {j} of {i}" for j in range(300)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None, help="HF model folder (default: embedded SmolLM2)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if args.model_path is None:
        from llmctl.core.embedded import ensure_embedded_model

        args.model_path = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    vocab = AutoConfig.from_pretrained(args.model_path).vocab_size
    grammars = Grammars(tokenizer, vocab, {tokenizer.convert_tokens_to_ids("<|im_end|>")})
    grammars.matcher(constraint("small schema", -1))  # the vocabulary index, once per server

    box = CompileSandbox()
    started = time.perf_counter()
    box.validate(structured.serialize(constraint("small schema", -2)))
    print(f"tokenizer: {args.model_path.name}, vocab {vocab}; worker start + first validation: "
          f"{(time.perf_counter() - started) * 1000:.0f} ms")
    shipped = structured._check_in_sandbox
    structured.sandbox = lambda: box
    print(f"{'constraint':18} {'with sandbox ms':>16} {'without ms':>11} {'ratio':>6}")
    serial = 0
    for kind in ("small schema", "200-field schema", "regex", "choice"):
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for sandboxed in (True, False):  # alternated, so both see the same machine
                serial += 1
                structured._check_in_sandbox = shipped if sandboxed else (lambda c, g: None)
                started = time.perf_counter()
                grammars.matcher(constraint(kind, serial))
                times[sandboxed].append((time.perf_counter() - started) * 1000)
        with_box, without = statistics.median(times[True]), statistics.median(times[False])
        print(f"{kind:18} {with_box:16.1f} {without:11.1f} {with_box / without:6.2f}")
    structured._check_in_sandbox = shipped
    box.close()


if __name__ == "__main__":
    main()
