"""`--speculative-config`: vLLM's JSON shape, each mistake named in one clear message."""

from __future__ import annotations

import pytest

from llmctl.core.speculation import parse
from llmctl.errors import ConfigError


def test_vllm_shapes_parse():
    spec = parse('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}')
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min) == \
        ("ngram", 5, 4, 4)  # as vLLM: one bound given sets the other
    assert parse('{"method": "ngram", "num_speculative_tokens": 3}').prompt_lookup_min == 5
    draft = parse('{"model": "/models/small", "num_speculative_tokens": 4}')
    assert draft.method == "draft_model" and str(draft.model) == "/models/small"
    assert draft.as_dict() == {"model": "/models/small", "num_speculative_tokens": 4}
    # vLLM's own keys pass through to vLLM, which checks them itself.
    assert parse('{"method": "eagle", "model": "x", "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1}',
                 strict=False).as_dict()["draft_tensor_parallel_size"] == 1


@pytest.mark.parametrize(("text", "message"), [
    ("{method: ngram}", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"num_speculative_tokens": 3}', 'needs "method"'),
    ('{"method": "ngram"}', 'needs "num_speculative_tokens"'),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "between 1 and 16"),
    ('{"method": "ngram", "num_speculative_tokens": "5"}', "must be a whole number"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
     "prompt_lookup_min <= prompt_lookup_max"),
    ('{"method": "eagle", "num_speculative_tokens": 3}', "not 'eagle'"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "draft_tensor_parallel_size": 2}',
     "does not implement 'draft_tensor_parallel_size'"),
    ('{"method": "draft_model", "num_speculative_tokens": 3}', 'needs "model"'),
    ('{"method": "ngram", "model": "/m", "num_speculative_tokens": 3}', "goes with the draft_model method"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 0}', "at least 1"),
])
def test_mistakes_are_named(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        parse(text)
    assert "--speculative-config" in str(caught.value)
