"""The grammar layer on the tiny model's tokenizer: compile, cache, per-row masks, end of grammar."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from llmctl.engine.structured import BatchMasks, Constraint, GrammarError, Grammars, end_reason

PAD = 40  # the model's logits are wider than the tokenizer's vocabulary, as with padded embeddings
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["n", "tag"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture()
def grammars(tokenizer):
    return Grammars(tokenizer, len(tokenizer) + PAD, {tokenizer.eos_token_id})


def _run(grammars, tokenizer, matchers, steps: int, seed: int) -> list[list[int]]:
    """Greedy decoding over random logits, masked; stops a row at end of sequence or end of grammar."""
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = [[] for _ in matchers]
    live = list(range(len(matchers)))
    for _ in range(steps):
        if not live:
            break
        rows = [matchers[i] for i in live]
        masks = BatchMasks.of(rows, grammars.vocab_size, "cpu")
        logits = torch.randn((len(live), grammars.vocab_size), generator=gen)
        tokens = torch.argmax(masks.apply(logits) if masks else logits, dim=-1).tolist()
        if masks:
            masks.accept(tokens)
        for i, token in zip(list(live), tokens, strict=False):
            if token == tokenizer.eos_token_id or end_reason(matchers[i]):
                live.remove(i)
            if token != tokenizer.eos_token_id:
                out[i].append(token)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_constrained_rows_produce_valid_output_beside_a_free_row(grammars, tokenizer, seed):
    json_m = grammars.matcher(Constraint.json_schema(SCHEMA))
    regex_m = grammars.matcher(Constraint("regex", r"[a-c]{2}-[0-9]{1,3}"))
    choice_m = grammars.matcher(Constraint("choice", json.dumps(["yes", "no", "it \"depends\""])))
    out = _run(grammars, tokenizer, [json_m, None, regex_m, choice_m], steps=120, seed=seed)
    jsonschema.validate(json.loads(tokenizer.decode(out[0])), SCHEMA)
    import re

    assert re.fullmatch(r"[a-c]{2}-[0-9]{1,3}", tokenizer.decode(out[2]))
    assert tokenizer.decode(out[3]) in ("yes", "no", 'it "depends"')
    assert end_reason(choice_m) == ("stop", None)


def test_masks_leave_free_rows_alone_and_block_padded_ids(grammars, tokenizer):
    matcher = grammars.matcher(Constraint.json_schema({"type": "object"}))
    masks = BatchMasks.of([None, matcher], grammars.vocab_size, "cpu")
    logits = torch.randn((2, grammars.vocab_size))
    masked = masks.apply(logits)
    assert torch.equal(masked[0], logits[0])  # the free row: untouched
    assert torch.isinf(masked[1, len(tokenizer):]).all()  # ids beyond the tokenizer: never allowed
    allowed = (~torch.isinf(masked[1])).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).lstrip().startswith("{") for t in allowed)
    assert BatchMasks.of([None, None], grammars.vocab_size, "cpu") is None  # no constrained row: no work at all


def test_compiled_grammars_are_cached_with_a_bound(tokenizer):
    grammars = Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id}, cache_size=2)
    grammars.matcher(Constraint.json_schema(SCHEMA))
    # The same schema again (keys in another order are another grammar: JSON keys keep the schema's order).
    grammars.matcher(Constraint.json_schema(json.loads(json.dumps(SCHEMA))))
    assert (grammars.stats.compiles, grammars.stats.cache_hits) == (1, 1)
    for pattern in ("a+", "b+", "c+"):
        grammars.matcher(Constraint("regex", pattern))
    assert len(grammars._cache) == 2 and grammars.stats.compiles == 4


@pytest.mark.parametrize(("constraint", "words"), [
    (Constraint.json_schema({"type": "string", "format": "no-such-format"}), "no-such-format"),
    (Constraint.json_schema({"$ref": "#/definitions/missing"}, param="structured_outputs.json"), "missing"),
    (Constraint("regex", "([a-z]", param="structured_outputs.regex"), "regex"),
    (Constraint("grammar", "start: undefined_rule", param="structured_outputs.grammar"), "undefined_rule"),
    (Constraint("choice", "not a list", param="structured_outputs.choice"), "choice"),
])
def test_a_constraint_that_does_not_compile_is_a_400_naming_the_field(grammars, constraint, words):
    with pytest.raises(GrammarError) as info:
        grammars.matcher(constraint)
    assert info.value.status == 400 and info.value.param == constraint.param
    assert words in info.value.message and constraint.param in info.value.message


def test_gbnf_grammars_are_accepted_too(grammars, tokenizer):
    matcher = grammars.matcher(Constraint("grammar", 'root ::= "ab" [0-9]'))
    for token in tokenizer("ab7", add_special_tokens=False)["input_ids"]:
        matcher.accept(token)
    assert end_reason(matcher) == ("stop", None)
