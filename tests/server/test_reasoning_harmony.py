"""The `openai_gptoss` reasoning parser against OpenAI's own harmony library: what openai-harmony renders, token
by token, splits into the thinking and final text that openai-harmony itself reads from the same tokens; and
the prompt openai-harmony renders leaves the model where the parser expects.

openai-harmony needs the o200k_base vocabulary (CI prepares it: .ci/harmony_vocab.sh and TIKTOKEN_ENCODINGS_BASE).
"""

from __future__ import annotations

import json

import pytest

from llmctl.server.reasoning import PARSERS
from llmctl.server.tools import PARSERS as TOOL_PARSERS

# openai-harmony and its vocabulary (or the skip that says why not), as the tool-call tests load them.
from tests.server.test_tool_parser_harmony import ENCODING, Message, Role, assistant, harmony
from tests.server.test_tool_parsers import TOOLS

ANSWERS = {
    "thinking then an answer": [assistant("The user greets. Reply briefly.", "analysis"),
                                assistant("Hello!", "final")],
    "thinking twice then an answer": [assistant("First thought.", "analysis"),
                                      assistant("Second thought.", "analysis"), assistant("Hi.", "final")],
    "thinking then a call": [assistant("Need the weather.", "analysis"),
                             assistant('{"city": "Paris"}', "commentary", "functions.get_weather")],
    "an answer without thinking": [assistant("Just this.", "final")],
}


@pytest.mark.parametrize("case", list(ANSWERS))
def test_the_parser_agrees_with_openai_harmony(case):
    tokens = [t for message in ANSWERS[case] for t in ENCODING.render(message)]
    completion = tokens[2:]  # the model's output starts after the prompt's "<|start|>assistant"
    expected = ENCODING.parse_messages_from_completion_tokens(completion, Role.ASSISTANT)
    want_thinking = "\n".join(m.content[0].text for m in expected if m.channel == "analysis")
    want_final = "".join(m.content[0].text for m in expected if m.channel == "final")
    want_calls = [(m.recipient.removeprefix("functions."), json.loads(m.content[0].text)) for m in expected
                  if m.recipient]
    reasoning = PARSERS["openai_gptoss"]()
    tools = TOOL_PARSERS["openai"](TOOLS)
    thinking = shown = ""
    for piece in [*(reasoning.feed(ENCODING.decode([t])) for t in completion), reasoning.finish()]:
        thinking += piece.reasoning
        shown += tools.feed(piece.answer)
    rest, calls = tools.finish()
    assert thinking == want_thinking
    assert shown + rest == want_final
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == want_calls
    assert reasoning.thinking == (not want_final and not want_calls)


def test_the_rendered_prompt_leaves_the_header_to_the_model():
    conversation = harmony.Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, harmony.SystemContent.new()),
        Message.from_role_and_content(Role.USER, "Hi")])
    prompt = ENCODING.decode(ENCODING.render_conversation_for_completion(conversation, Role.ASSISTANT))
    parser_class = PARSERS["openai_gptoss"]
    assert parser_class.opening(prompt) == "either" and not parser_class.starts_inside(prompt)
    # A prompt that opens the analysis channel leaves the model inside its thinking.
    assert parser_class.opening(prompt + "<|channel|>analysis<|message|>") == "thinking"
    budget_closed = ENCODING.decode(ENCODING.encode(parser_class.close, allowed_special="all"))
    assert budget_closed == parser_class.close  # the closing text is harmony's own tokens
