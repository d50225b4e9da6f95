"""Each reasoning parser on text: whole, streamed split at every boundary and character by character; `auto`;
where a rendered prompt leaves the model (the test templates in tests/server/templates/reasoning/)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from llmctl.server.reasoning import PARSERS, ReasoningParser, detect_reasoning, resolve_reasoning
from llmctl.server.tools import PARSERS as TOOL_PARSERS
from tests.server.test_tool_parsers import TOOLS, as_pairs, splits

TEMPLATES = Path(__file__).parent / "templates" / "reasoning"
HARMONY_ANSWER = "<|start|>assistant<|channel|>final<|message|>Sunny.<|return|>"
# (parser, opening, output, thinking, answer as the parser hands it on)
CASES = [
    ("qwen3", "either", "<think>\nThe user asks.\nEasy.\n</think>\n\nSunny in Paris.", "The user asks.\nEasy.",
     "Sunny in Paris."),
    ("qwen3", "either", "Sunny, no thinking.\n", "", "Sunny, no thinking.\n"),
    ("qwen3", "either", "  <thin-ice> is a tag.", "", "  <thin-ice> is a tag."),
    ("qwen3", "thinking", "Hmm.\n</think>\n\nSunny.", "Hmm.", "Sunny."),
    ("qwen3", "thinking", "<think>Hmm.</think>Sunny.", "Hmm.", "Sunny."),
    ("qwen3", "answer", "Sunny. </think> stays text.", "", "Sunny. </think> stays text."),
    ("qwen3", "either", "<think>\nCut short by max_tok", "Cut short by max_tok", ""),
    ("qwen3", "either", "<thi", "", "<thi"),
    ("deepseek_r1", "either", "I think.</think>\n\nSunny.", "I think.", "Sunny."),
    ("deepseek_r1", "either", "<think>\nI think.\n</think>\n\nSunny.", "I think.", "Sunny."),
    ("deepseek_r1", "thinking", "Long thought, never closed", "Long thought, never closed", ""),
    ("deepseek_r1", "answer", "Sunny.", "", "Sunny."),
    ("openai_gptoss", "either", "<|channel|>analysis<|message|>Weather asked.<|end|>" + HARMONY_ANSWER,
     "Weather asked.", HARMONY_ANSWER),
    ("openai_gptoss", "either", "<|channel|>analysis<|message|>One.<|end|><|start|>assistant<|channel|>analysis"
     "<|message|>Two.<|end|>" + HARMONY_ANSWER, "One.\nTwo.", HARMONY_ANSWER),
    ("openai_gptoss", "either", "<|channel|>final<|message|>Sunny.", "", "<|channel|>final<|message|>Sunny."),
    ("openai_gptoss", "either", "<|channel|>analysis<|message|>Cut sh", "Cut sh", ""),
    ("openai_gptoss", "either", "No harmony at all.", "", "No harmony at all."),
    ("openai_gptoss", "thinking", "Thought.<|end|>" + HARMONY_ANSWER, "Thought.", HARMONY_ANSWER),
    ("openai_gptoss", "answer", "Sunny.<|return|>", "", "<|channel|>final<|message|>Sunny.<|return|>"),
]
MARKUP = ("<think>", "</think>", "<|channel|>analysis", "<|message|>Weather")


def run(name: str, opening: str, pieces: list[str]) -> tuple[str, str, ReasoningParser]:
    parser = PARSERS[name](opening)  # type: ignore[arg-type]
    out = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    return "".join(p.reasoning for p in out), "".join(p.answer for p in out), parser


@pytest.mark.parametrize(("name", "opening", "text", "thinking", "answer"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_thinking_is_split_from_the_answer_however_the_text_is_split(name, opening, text, thinking, answer):
    for pieces in splits(text):
        got_thinking, got_answer, parser = run(name, opening, pieces)
        assert (got_thinking, got_answer) == (thinking, answer), pieces
        assert parser.reasoning_text == thinking
        assert not any(mark in got_thinking for mark in MARKUP)
        if thinking:
            assert thinking.split()[0] in parser.thought and not (answer and answer in parser.thought)


def test_nothing_of_the_markup_is_handed_out_before_it_is_whole():
    parser = PARSERS["qwen3"]()
    assert parser.feed("<th") == parser.feed("ink>\n") == parser.feed("") and parser.thinking
    assert parser.feed("Hmm").reasoning == "Hmm"
    assert parser.feed(" more</th").reasoning == " more"
    assert parser.feed("ink>\n\nSun").answer == "Sun" and not parser.thinking


def test_thinking_ends_where_the_end_text_or_the_budget_close_is_written():
    for parser_class in PARSERS.values():
        parser = parser_class("thinking")
        parser.feed("A thought")
        assert parser.thinking
        parser.feed(parser_class.close)
        assert not parser.thinking, parser_class.name
        assert parser_class.end in parser_class.close


def test_tool_calls_are_read_from_the_answer_only():
    """A call written inside the thinking is thought, not a call; the one in the answer is the call."""
    text = ('<think>Maybe <tool_call>{"name": "get_time", "arguments": {}}</tool_call>? No.</think>\n\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    for pieces in splits(text):
        reasoning = PARSERS["qwen3"]()
        tools = TOOL_PARSERS["hermes"](TOOLS)
        thought = ""
        for piece in [*(reasoning.feed(p) for p in pieces), reasoning.finish()]:
            thought += piece.reasoning
            tools.feed(piece.answer)
        _, calls = tools.finish()
        assert as_pairs(calls) == [("get_weather", {"city": "Paris"})] and "get_time" in thought


def test_harmony_answer_is_read_by_the_harmony_tool_parser():
    text = ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather"
            '<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>')
    reasoning, answer, _ = run("openai_gptoss", "either", [text])
    tools = TOOL_PARSERS["openai"](TOOLS)
    shown = tools.feed(answer)
    rest, calls = tools.finish()
    assert reasoning == "Need weather." and shown + rest == ""
    assert as_pairs(calls) == [("get_weather", {"city": "Paris"})]


def fake_tokenizer(template: str, vocab: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(chat_template=template, get_vocab=lambda: vocab or {})


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_auto_reads_the_family_from_the_chat_template(family):
    name, why = detect_reasoning(fake_tokenizer((TEMPLATES / f"{family}.jinja").read_text()))
    assert name == family and why.startswith("the template")


def test_auto_without_thinking_markers_is_none():
    hermes = (TEMPLATES.parent / "hermes.jinja").read_text()
    assert detect_reasoning(fake_tokenizer(hermes)) == (
        None, "neither the chat template nor the vocabulary has thinking markers")
    family, why = resolve_reasoning("auto", fake_tokenizer(hermes))
    assert family is None and "--reasoning-parser" in why
    assert detect_reasoning(fake_tokenizer("{{ messages }}", {"<think>": 7, "</think>": 8}))[0] == "qwen3"
    assert detect_reasoning(fake_tokenizer("{{ messages }}", {"<|channel|>": 7}))[0] == "openai_gptoss"
    # The harmony tool template names the channels but not analysis' role in a turn: still gpt-oss.
    assert detect_reasoning(fake_tokenizer((TEMPLATES.parent / "openai.jinja").read_text()))[0] == "openai_gptoss"
    assert resolve_reasoning("none", fake_tokenizer((TEMPLATES / "qwen3.jinja").read_text()))[0] is None
    assert resolve_reasoning("deepseek_r1", fake_tokenizer(hermes))[0] is PARSERS["deepseek_r1"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize(("family", "kwargs", "opening"), [
    ("qwen3", {}, "either"), ("qwen3", {"enable_thinking": False}, "answer"),
    ("deepseek_r1", {}, "thinking"), ("openai_gptoss", {}, "either")])
def test_where_a_rendered_prompt_leaves_the_model(family, kwargs, opening, tokenizer):
    tokenizer.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=False, **kwargs)
    parser_class = PARSERS[family]
    assert parser_class.opening(prompt) == opening
    assert parser_class.starts_inside(prompt) == (opening == "thinking" or (
        opening == "either" and family == "deepseek_r1"))


def test_gpt_oss_template_gets_content_and_thinking_of_a_calling_turn_as_one_analysis(tokenizer):
    """gpt-oss' template refuses a calling turn with both content and thinking; both reach it as its thinking."""
    from llmctl.server.api.chat_models import ChatMessage
    from llmctl.server.api.prompts import chat_prompt

    tokenizer.chat_template = (
        "{%- for message in messages %}{%- if message.role == 'assistant' and message.tool_calls %}"
        "{%- if message.content and message.thinking %}{{ raise_exception('Cannot pass both content and thinking "
        "in an assistant message with tool calls!') }}{%- endif %}"
        "<|start|>assistant<|channel|>analysis<|message|>{{ message.thinking or message.content }}<|end|>"
        "{%- else %}<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>{%- endif %}{%- endfor %}")
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [ChatMessage(role="user", content="Weather?"),
                ChatMessage(role="assistant", content="Let me check.", tool_calls=[call],
                                    reasoning="The user wants the weather.")]
    text = tokenizer.decode(chat_prompt(SimpleNamespace(tokenizer=tokenizer), [m.for_template() for m in messages],
                                        None))
    assert "analysis<|message|>The user wants the weather.\n\nLet me check.<|end|>" in text


def test_the_server_logs_what_auto_chose_and_why(tiny_model, tmp_path, caplog):
    import logging
    import shutil

    from tests.conftest import make_service

    with caplog.at_level(logging.INFO, logger="llmctl.server.service"):
        make_service(tiny_model).shutdown()  # ChatML, a vocabulary without <think>
        thinking = shutil.copytree(tiny_model, tmp_path / "tiny-llama")
        (thinking / "chat_template.jinja").write_text((TEMPLATES / "qwen3.jinja").read_text())
        make_service(thinking).shutdown()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Reasoning:")]
    assert lines[0].startswith("Reasoning: not parsed (auto: neither the chat template nor the vocabulary")
    assert lines[1] == "Reasoning: qwen3 (auto: the template writes <think>...</think> (Qwen3, QwQ, SmolLM3 and kin))"
