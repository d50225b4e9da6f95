"""The `openai` (harmony) parser against OpenAI's own harmony library: what openai-harmony renders, token by
token, parses to the calls and final text that openai-harmony itself reads from the same tokens.

openai-harmony needs the o200k_base vocabulary, which it downloads; where it cannot, the tests skip.
CI prepares the file from the `tiktoken` npm package (.ci/harmony_vocab.sh) and points
TIKTOKEN_ENCODINGS_BASE at it.
"""

from __future__ import annotations

import json

import pytest

from llmctl.server.tools import PARSERS
from tests.server.test_tool_parsers import TOOLS

harmony = pytest.importorskip("openai_harmony")
try:
    ENCODING = harmony.load_harmony_encoding(harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
except harmony.HarmonyError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"openai-harmony cannot load its vocabulary ({exc}); set TIKTOKEN_ENCODINGS_BASE "
                "(bash .ci/harmony_vocab.sh prepares it)", allow_module_level=True)

Role, Message = harmony.Role, harmony.Message


def assistant(text: str, channel: str, recipient: str | None = None) -> Message:
    message = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    if recipient:
        message = message.with_recipient(recipient).with_content_type("<|constrain|>json")
    return message


ANSWERS = {
    "reasoning then two calls": [
        assistant("The user wants the weather and the time.", "analysis"),
        assistant('{"city": "Paris"}', "commentary", "functions.get_weather"),
        assistant('{"zone": "CET"}', "commentary", "functions.get_time")],
    "reasoning then an answer": [
        assistant("Easy one.", "analysis"), assistant("It is sunny in Paris.", "final")],
    "a preamble then a call": [
        assistant("Let me check the weather.", "commentary"),
        assistant('{"city": "Rome"}', "commentary", "functions.get_weather")],
}


@pytest.mark.parametrize("case", list(ANSWERS))
def test_the_parser_agrees_with_openai_harmony(case):
    tokens = [t for message in ANSWERS[case] for t in ENCODING.render(message)]
    # The model's completion starts after the prompt's "<|start|>assistant"; it stops at <|call|> / <|return|>.
    completion = tokens[2:]
    expected = ENCODING.parse_messages_from_completion_tokens(completion, Role.ASSISTANT)
    want_calls = [(m.recipient.removeprefix("functions."), json.loads(m.content[0].text)) for m in expected
                  if m.recipient]
    want_text = "".join(m.content[0].text for m in expected if not m.recipient and m.channel in ("final",
                                                                                                  "commentary"))
    parser = PARSERS["openai"](TOOLS)
    shown = "".join(parser.feed(ENCODING.decode([t])) for t in completion)
    rest, calls = parser.finish()
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == want_calls
    assert shown + rest == want_text
