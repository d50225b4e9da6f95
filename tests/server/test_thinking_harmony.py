"""gpt-oss' harmony format: `reasoning_effort` reaches the template as openai-harmony writes it, and a budget closes
the analysis channel with the switch to `final`, after which the schema holds the answer; openai-harmony itself
parses what the engine wrote into an analysis and a final message.

The tiny model has harmony's special tokens. It is scripted to open the analysis channel, then writes one word
wherever it is free to (a bonus on its logit after the real forward pass).
"""

from __future__ import annotations

import json

import openai
import pytest

from llmctl.server.testing import build_tiny_model, serve_in_thread
from tests.conftest import make_service

# openai-harmony and its vocabulary (or the skip that says why not), as the tool-call tests load them.
from tests.server.test_tool_parser_harmony import ENCODING, harmony

SPECIALS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>")
# gpt-oss' template, reduced: the system message carries the effort as harmony writes it.
TEMPLATE = ("<|start|>system<|message|>You are ChatGPT.\nReasoning: {{ reasoning_effort or 'medium' }}\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
            "{%- for message in messages %}<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>"
            "{%- endfor %}{%- if add_generation_prompt %}<|start|>assistant{% endif %}")
OPEN_ANALYSIS = "<|channel|>analysis<|message|>"
WORD = " fox"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Is it?"}]


@pytest.fixture(scope="module", params=["special tokens", "text"])
def served(request, tmp_path_factory):
    """The harmony markers as special tokens (gpt-oss' vocabulary), or as text (as test templates write them)."""
    specials = SPECIALS if request.param == "special tokens" else ()
    model = build_tiny_model(tmp_path_factory.mktemp("harmony") / "tiny-llama", extra_specials=specials,
                             context=512)
    service = make_service(model, reasoning_parser="openai_gptoss", tool_call_parser="openai")
    tokenizer = service.loaded.tokenizer
    tokenizer.chat_template = TEMPLATE
    script = tokenizer.encode(OPEN_ANALYSIS, add_special_tokens=False)
    word, = tokenizer.encode(WORD, add_special_tokens=False)
    model, engine = service.engine.model, service.engine
    real, submit = model.forward, engine.submit
    submitted = []

    def forward(*args, **kwargs):  # one request at a time: its n-th generated token is the script's n-th
        out = real(*args, **kwargs)  # (counted by its output, not by passes: a long prompt prefills in chunks)
        n = len(submitted[-1].output_ids) if submitted else 0
        out.logits[:, -1, script[n] if n < len(script) else word] += 100.0
        return out

    def record(seq):
        submitted.append(seq)
        return submit(seq)

    model.forward, engine.submit = forward, record
    with serve_in_thread(service) as url:
        yield service, url, submitted
    service.shutdown()


def test_reasoning_effort_is_the_line_openai_harmony_writes(served):
    service, url, submitted = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for effort in ("low", "high"):
        client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=1, reasoning_effort=effort)
        system = harmony.SystemContent.new().with_reasoning_effort(harmony.ReasoningEffort(effort.capitalize()))
        rendered = ENCODING.decode(ENCODING.render(harmony.Message.from_role_and_content(harmony.Role.SYSTEM, system)))
        line, = [line for line in rendered.splitlines() if line.startswith("Reasoning:")]
        assert line == f"Reasoning: {effort}"
        assert line in service.loaded.tokenizer.decode(submitted[-1].prompt_ids).splitlines()


def test_a_budget_switches_to_the_final_channel_and_the_schema_holds_the_answer(served):
    service, url, submitted = served
    tokenizer = service.loaded.tokenizer
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for budget in (2, 5):
        out = client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=80,
            response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": SCHEMA}},
            extra_body={"thinking_token_budget": budget})
        message = out.choices[0].message
        assert message.reasoning_content == WORD * budget
        assert json.loads(message.content) in ({"ok": True}, {"ok": False})
        # What the engine wrote is harmony openai-harmony reads: an analysis message, then the final answer.
        written = tokenizer.decode(submitted[-1].output_ids, skip_special_tokens=False)
        parsed = ENCODING.parse_messages_from_completion_tokens(ENCODING.encode(written, allowed_special="all"),
                                                                harmony.Role.ASSISTANT)
        assert [(m.channel, m.content[0].text) for m in parsed] == [
            ("analysis", WORD * budget), ("final", message.content)]


def test_a_forced_call_follows_the_analysis_on_the_commentary_channel(served):
    service, url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    tool = {"type": "function", "function": {"name": "answer", "parameters": SCHEMA}}
    for budget in (0, 3):
        out = client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=300, tools=[tool], tool_choice="required",
            extra_body={"thinking_token_budget": budget})
        message = out.choices[0].message
        assert (message.reasoning_content or "") == WORD * budget
        call, = message.tool_calls
        assert call.function.name == "answer" and json.loads(call.function.arguments) in ({"ok": True},
                                                                                           {"ok": False})
