"""`--tool-call-parser auto`, the special tokens a format keeps, and each family's template and parser agreeing.

The chat templates in tests/server/templates/ are reduced versions that write each family's
documented format (no real template can be downloaded here); Mistral's own tokenizer comes from
mistral-common, which ships it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from llmctl.server.testing import build_tiny_model
from llmctl.server.tools import PARSERS, detect_parser, hidden_specials
from tests.conftest import scripted_server
from tests.server.test_tool_parsers import TOOLS, as_pairs

TEMPLATES = Path(__file__).parent / "templates"
FAMILIES = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]
ENDS = ("<|eot_id|>", "<|im_end|>", "<|call|>", "<|im_start|>", "</s>")


def fake_tokenizer(template: str, vocab: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(chat_template=template, get_vocab=lambda: vocab or {})


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_reads_the_family_from_the_chat_template(family):
    name, why = detect_parser(fake_tokenizer((TEMPLATES / f"{family}.jinja").read_text()))
    assert name == family and why.startswith("the template")


def test_auto_without_a_known_format():
    assert detect_parser(fake_tokenizer("{{ messages }}")) == (None, "the chat template does not render tools")
    name, why = detect_parser(fake_tokenizer("{% if tools %}Tools: {{ tools }}{% endif %}{{ messages }}"))
    assert name is None and "no call format" in why
    assert detect_parser(fake_tokenizer("{{ messages }}", {"[TOOL_CALLS]": 5}))[0] == "mistral"
    assert detect_parser(SimpleNamespace(chat_template={"default": "x", "tool_use": "<tool_call>"},
                                         get_vocab=dict))[0] == "hermes"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_parser_reads_back_the_calls_its_family_template_writes_in_history(family, tokenizer):
    tokenizer.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    user = [{"role": "user", "content": "Weather in Paris, and the time?"}]
    history = [*user, {"role": "assistant", "content": "", "tool_calls": [
        {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}} for c in CALLS]}]
    whole = tokenizer.apply_chat_template(history, tools=TOOLS, tokenize=False)
    # The same history with a text answer instead: where the two differ is where the model's answer starts.
    text = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": "SENTINEL"}], tools=TOOLS,
                                         tokenize=False)
    turn = whole[len(os.path.commonprefix([whole, text])):]
    for end in ENDS if family != "openai" else ():  # harmony's end tokens are part of its format
        turn = turn.split(end)[0]
    parser = PARSERS[family](TOOLS)
    sent = "".join(parser.feed(c) for c in turn)
    rest, calls = parser.finish()
    assert as_pairs(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})], turn
    assert (sent + rest).strip() == ""


def test_mistral_common_tool_calls_parse_token_by_token():
    """Mistral's own tokenizer (tekken, v3 format) writes the calls; its tokens, decoded one by one with the
    control tokens kept, are fed to the parser as a server streams them."""
    pytest.importorskip("mistral_common")
    from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mistral = MistralTokenizer.v3(is_tekken=True)
    calls = [ToolCall(id=f"abcdefgh{i}", function=FunctionCall(name=c["function"]["name"],
                                                                arguments=c["function"]["arguments"]))
             for i, c in enumerate(CALLS)]
    request = ChatCompletionRequest(
        tools=[Tool(function=Function(name=t["function"]["name"], parameters=t["function"]["parameters"]))
               for t in TOOLS],
        messages=[UserMessage(content="Weather?"), AssistantMessage(tool_calls=calls),
                  *[ToolMessage(tool_call_id=c.id, content="18") for c in calls]])
    tokens = mistral.encode_chat_completion(request).tokens
    inner = mistral.instruct_tokenizer.tokenizer
    start = tokens.index(inner.get_special_token("[TOOL_CALLS]"))
    end = tokens.index(inner.eos_id, start)
    pieces = [inner.decode([t], special_token_policy=SpecialTokenPolicy.KEEP) for t in tokens[start:end]]
    parser = PARSERS["mistral"](TOOLS)
    sent = "".join(parser.feed(p) for p in ["Sure. ", *pieces])
    rest, got = parser.finish()
    assert sent + rest == "Sure. " or (sent, rest) == ("Sure. ", "")
    assert as_pairs(got) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]


@pytest.fixture(scope="module")
def mistral_model(tmp_path_factory) -> Path:
    """A tiny model with Mistral's format: [TOOL_CALLS] is a special token, the template writes it."""
    from transformers import AutoTokenizer

    folder = build_tiny_model(tmp_path_factory.mktemp("mistral") / "tiny-llama", context=1024)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    tok.chat_template = (TEMPLATES / "mistral.jinja").read_text()
    tok.save_pretrained(folder)
    return folder


def test_auto_picks_mistral_and_keeps_its_special_token_in_the_parsed_text(mistral_model, caplog):
    with caplog.at_level(logging.INFO, logger="llmctl.server.service"), \
            scripted_server(mistral_model) as (url, say):
        assert "Tool calls: mistral (auto: the template writes [TOOL_CALLS])" in caplog.text
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        say('Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]')
        user = [{"role": "user", "content": "Weather in Paris?"}]
        out = sdk.chat.completions.create(model="tiny-llama", messages=user, tools=TOOLS)
        message = out.choices[0].message
        assert message.content == "Sure." and out.choices[0].finish_reason == "tool_calls"
        assert as_pairs([c.model_dump() for c in message.tool_calls]) == [("get_weather", {"city": "Paris"})]
        # The agent's next turn renders the call and its result through the template (a 200, not a 400).
        say("It is 18 C.")
        follow = sdk.chat.completions.create(model="tiny-llama", tools=TOOLS, messages=[
            *user, message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "18 C"}])
        assert follow.choices[0].message.content == "It is 18 C."
        # Without tools, the special token is still text the parser would see; no parser runs, and the
        # answer is what the model wrote.
        say("Plain answer.")
        assert sdk.chat.completions.create(model="tiny-llama", messages=user).choices[0].message.content == \
            "Plain answer."


def test_only_the_format_tokens_are_kept(mistral_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mistral_model)
    hidden = hidden_specials(tok, PARSERS["mistral"])
    assert tok.convert_tokens_to_ids("[TOOL_CALLS]") not in hidden
    assert tok.eos_token_id in hidden and tok.bos_token_id in hidden
    assert hidden_specials(tok, PARSERS["hermes"]) is None
