"""The prompts a benchmark sends: the built-in seeded set, or a JSONL file."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from llmctl.errors import LLMCtlError

Messages = list[dict]

# Common English words that each encode as one token (with their leading space) in the BPE tokenizers
# of SmolLM2, GPT-2 and Llama-family models, so N words make a prompt of about N tokens.
WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "team minute idea body information back parent face level office door health person art war history "
    "party result change morning reason research girl moment air teacher force education foot boy age policy "
    "process music market sense nation plan college interest death experience effect class control care field "
    "role effort rate heart show leader light voice police mind price report decision son view town road arm "
    "value building action model season society tax director position player record paper space ground form "
    "event matter center couple site project activity star table need court oil situation cost industry "
    "figure street image phone data picture practice piece land product doctor wall patient worker news test "
    "movie north love support technology step baby computer type attention film tree source hair window"
).split()


class BenchError(LLMCtlError):
    """A benchmark that cannot run as asked (unreachable server, bad prompts file, bad flags)."""


class BuiltinPrompts(Sequence[Messages]):
    """``count`` single-message prompts of ``tokens`` words (about one token each), made on demand.

    Prompt i comes from its own generator seeded with (seed, offset + i), so it is the same in every
    run and every process however many prompts are asked for, and a long run costs no memory. With
    ``shared_prefix_tokens``, every prompt starts with the same system message of that many words
    (seeded by ``seed``), as an agent's instructions do: a server with a prefix cache computes it once.
    """

    def __init__(self, count: int, tokens: int, seed: int = 0, offset: int = 0, shared_prefix_tokens: int = 0) -> None:
        self.size, self.tokens, self.seed, self.offset = max(1, count), max(1, tokens), seed, offset
        rng = random.Random(f"llmctl-bench/{seed}/shared-prefix")
        self.system = " ".join(rng.choice(WORDS) for _ in range(shared_prefix_tokens))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        if not -self.size <= index < self.size:
            raise IndexError(index)
        rng = random.Random(f"llmctl-bench/{self.seed}/{self.offset + index % self.size}")
        user = {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(self.tokens))}
        return [{"role": "system", "content": self.system}, user] if self.system else [user]


def builtin_prompts(count: int, tokens: int, seed: int = 0, offset: int = 0,
                    shared_prefix_tokens: int = 0) -> BuiltinPrompts:
    """The built-in prompt set: prompts ``offset`` to ``offset + count - 1`` of the seeded sequence,
    each after a shared system message of ``shared_prefix_tokens`` words when that is not 0."""
    return BuiltinPrompts(count, tokens, seed, offset, shared_prefix_tokens)


def load_prompts(path: Path) -> list[Messages]:
    """Prompts from a JSONL file: one object a line, {"prompt": "..."} or {"messages": [...]}."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BenchError(f"Cannot read the prompts file {path}: {exc.strerror or exc}.") from None
    prompts: list[Messages] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path}:{number} is not valid JSON: {exc.msg}.") from None
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append([{"role": "user", "content": item["prompt"]}])
        elif isinstance(item, dict) and isinstance(item.get("messages"), list) and item["messages"]:
            prompts.append(item["messages"])
        else:
            raise BenchError(f'{path}:{number} needs a "prompt" string or a non-empty "messages" list.')
    if not prompts:
        raise BenchError(f"The prompts file {path} holds no prompts.")
    return prompts
