"""Compare the two grammar libraries llmctl could constrain decoding with: xgrammar and llguidance.

For one tokenizer (default: the embedded SmolLM2's), it measures
- set-up: turning the tokenizer into the library's vocabulary index (once per server),
- compile: from a JSON schema / regex to a matcher that has produced its first token mask
  (what the first request with a new schema waits for),
- mask: filling the next-token bitmasks of a batch of 16 rows, per decode step, while each row
  walks a random path through its grammar (a random allowed token each step),
- correctness: every finished walk must parse as JSON and validate against its schema, and
  hand-written valid/invalid documents must be accepted/rejected token by token.

    python scripts/bench_grammar.py [--model-path DIR] [--batch 16] [--steps 120] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import jsonschema
import torch

SCHEMAS: dict[str, dict] = {
    "object": {"type": "object"},
    "city": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "population": {"type": "integer"},
                       "country": {"type": "string", "enum": ["FR", "IT", "DE"]}},
        "required": ["name", "population", "country"], "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "owner": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                      "score": {"type": "number"}},
                      "required": ["age"], "additionalProperties": False},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "tags", "owner", "ok"], "additionalProperties": False,
    },
    "wide": {
        "type": "object",
        "properties": {f"field_{i}": {"type": ["integer", "string", "null"] if i % 3 else "boolean"}
                       for i in range(24)},
        "required": [f"field_{i}" for i in range(0, 24, 2)], "additionalProperties": False,
    },
}
VALID = {"city": '{"name": "Paris", "population": 2100000, "country": "FR"}',
         "nested": '{"id": "ABC-12", "tags": ["a", "b"], "owner": {"age": 40, "score": 1.5e3}, "ok": true}'}
INVALID = {"city": '{"name": "Paris", "population": "many", "country": "FR"}',
           "nested": '{"id": "abc-12", "tags": [], "owner": {"age": 40}, "ok": true}'}


# Both libraries write JSON the way json.dumps does, with no other whitespace (a model that may put
# whitespace anywhere can put it everywhere).
SEPARATORS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, eos: list[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False, max_threads=2)
        self.vocab_size = vocab_size

    def matcher(self, schema: dict):
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        for i, m in matchers:
            m.fill_next_token_bitmask(bitmask, i)

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)

    def done(self, m) -> bool:
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, eos: list[int]) -> None:
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.executor = llguidance.LLExecutor()
        self.vocab_size = vocab_size

    def matcher(self, schema: dict):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults=SEPARATORS)
        m = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        # What llguidance.torch.fill_next_token_bitmask_par does, without importing that module: it
        # decorates a function with torch.compile at import time, which costs seconds on a CPU.
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in matchers], bitmask.data_ptr(),
                                              bitmask.shape[1] * 4, bitmask.shape[0])

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token)

    def done(self, m) -> bool:
        return m.is_stopped()


def allowed(bitmask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = (bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].nonzero().flatten().tolist()


def bench(lib_cls, tokenizer, vocab: int, eos: list[int], batch: int, steps: int, seed: int) -> dict:
    t0 = time.perf_counter()
    lib = lib_cls(tokenizer, vocab, eos)
    setup = time.perf_counter() - t0
    out: dict = {"library": lib.name, "setup_s": round(setup, 3), "compile_ms": {}, "mask_ms_per_step": {},
                 "walks": {}, "documents": {}}
    bitmask = torch.full(((1), (vocab + 31) // 32), -1, dtype=torch.int32)
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        m = lib.matcher(schema)
        lib.fill([(0, m)], bitmask)
        out["compile_ms"][name] = round((time.perf_counter() - t0) * 1000, 1)
    for name in VALID:
        verdicts = []
        for doc in (VALID[name], INVALID[name]):
            m = lib.matcher(SCHEMAS[name])
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos[0]]
            verdicts.append(all(lib.accept(m, t) for t in ids))
        out["documents"][name] = {"valid_accepted": verdicts[0], "invalid_rejected": not verdicts[1]}
    rng = random.Random(seed)
    for name, schema in SCHEMAS.items():
        matchers = [lib.matcher(schema) for _ in range(batch)]
        tokens: list[list[int]] = [[] for _ in range(batch)]
        live = list(range(batch))
        bitmask = torch.full((batch, (vocab + 31) // 32), -1, dtype=torch.int32)
        times = []
        for _ in range(steps):
            if not live:
                break
            t0 = time.perf_counter()
            lib.fill([(i, matchers[i]) for i in live], bitmask)  # every live row each step, as a server does
            times.append(time.perf_counter() - t0)
            for i in list(live):
                choices = allowed(bitmask[i], vocab)
                # Prefer ending once allowed past a few tokens, so walks finish; else a random token.
                ends = [t for t in choices if t in eos]
                token = ends[0] if ends and (len(tokens[i]) > 24 or rng.random() < 0.2) else rng.choice(
                    [t for t in choices if t not in eos] or choices)
                assert lib.accept(matchers[i], token), (lib.name, name, token)
                if token in eos:
                    live.remove(i)
                else:
                    tokens[i].append(token)
        valid, invalid = 0, []
        for i in range(batch):
            if i in live:
                continue
            text = tokenizer.decode(tokens[i])
            try:
                jsonschema.validate(json.loads(text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                invalid.append(text)
        out["mask_ms_per_step"][name] = round(statistics.median(times) * 1000, 3)
        out["walks"][name] = {"finished_and_valid": valid, "unfinished": len(live), "invalid": invalid}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None, help="HF model folder (default: embedded SmolLM2)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    if args.model_path is None:
        from llmctl.core.embedded import ensure_embedded_model

        args.model_path = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    vocab = AutoConfig.from_pretrained(args.model_path).vocab_size
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    print(f"tokenizer: {args.model_path.name}, {len(tokenizer)} tokens, model vocab {vocab}, batch {args.batch}")
    results = [bench(cls, tokenizer, vocab, eos, args.batch, args.steps, args.seed) for cls in (XGrammar, LLGuidance)]
    for r in results:
        print(f"\n{r['library']}: set-up {r['setup_s']} s")
        print("  compile + first mask (ms): " + ", ".join(f"{k} {v}" for k, v in r["compile_ms"].items()))
        print(f"  mask fill per step, batch {args.batch} (ms, median): "
              + ", ".join(f"{k} {v}" for k, v in r["mask_ms_per_step"].items()))
        print("  random walks (finished and valid / unfinished / invalid): " + ", ".join(
            f"{k} {v['finished_and_valid']}/{v['unfinished']}/{len(v['invalid'])}" for k, v in r["walks"].items()))
        for k, v in r["walks"].items():
            for text in v["invalid"]:
                print(f"    invalid {k}: {text!r}")
        print("  documents: " + ", ".join(f"{k} {v}" for k, v in r["documents"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
