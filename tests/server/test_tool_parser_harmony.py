"""The `openai` (harmony) parser against OpenAI's own harmony library: what openai-harmony renders, token by
token, parses to the calls and final text that openai-harmony itself reads from the same tokens.

An enforced call through the server, from a model whose vocabulary has harmony's markers as special tokens
(as gpt-oss' has), is written with those tokens and parsed into the call.

openai-harmony needs the o200k_base vocabulary, which it downloads; where it cannot, the tests skip.
CI prepares the file from the `tiktoken` npm package (.ci/harmony_vocab.sh) and points
TIKTOKEN_ENCODINGS_BASE at it.
"""

from __future__ import annotations

import json

import openai
import pytest

from llmctl.server.testing import build_tiny_model, serve_in_thread
from llmctl.server.tools import PARSERS
from tests.conftest import make_service
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


ANSWER = {"type": "function", "function": {"name": "answer", "parameters": {
    "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}


@pytest.fixture(scope="module")
def harmony_served(tmp_path_factory):
    """A tiny model whose vocabulary has harmony's markers as special tokens, served with the `openai` parser."""
    model = build_tiny_model(tmp_path_factory.mktemp("harmony-tools") / "tiny-llama",
                             extra_specials=PARSERS["openai"].special_tokens)
    # No reasoning parser: the call is the whole answer (test_thinking_harmony has it after the analysis).
    service = make_service(model, tool_call_parser="openai", reasoning_parser="none")
    engine, submitted = service.engine, []
    submit = engine.submit

    def record(seq):
        submitted.append(seq)
        return submit(seq)

    engine.submit = record
    with serve_in_thread(service) as url:
        yield service, url, submitted
    service.shutdown()


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "answer"}}])
def test_an_enforced_call_is_written_with_harmony_special_tokens_and_parsed(harmony_served, choice):
    service, url, submitted = harmony_served
    tokenizer = service.loaded.tokenizer
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Is it?"}],
                                         tools=[*TOOLS, ANSWER] if isinstance(choice, dict) else [ANSWER],
                                         tool_choice=choice, max_tokens=60)
    call, = out.choices[0].message.tool_calls
    assert call.function.name == "answer" and json.loads(call.function.arguments) in ({"ok": True}, {"ok": False})
    written = submitted[-1].output_ids
    # The markers are the vocabulary's special tokens, not text spelling them.
    for marker in ("<|channel|>", "<|constrain|>", "<|message|>"):
        assert tokenizer.convert_tokens_to_ids(marker) in written
    text = tokenizer.decode(written, skip_special_tokens=False)
    message, = ENCODING.parse_messages_from_completion_tokens(ENCODING.encode(text, allowed_special="all"),
                                                              Role.ASSISTANT)
    assert (message.channel, message.recipient, json.loads(message.content[0].text)) == (
        "commentary", "functions.answer", json.loads(call.function.arguments))
