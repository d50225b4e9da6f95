"""Earlier turns' tool calls and results reach the chat template the same way on all three APIs.

The same agent history (a question, two parallel calls, their results, a follow-up) is sent as chat
messages, as Responses input items and as Anthropic blocks; each API's template messages are rendered
with each family's test template (tests/server/templates/, as in test_tool_parser_auto.py) and must
give the same prompt, with the calls' arguments as objects and each result next to its call's name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import jinja2
import pytest
from transformers import AutoTokenizer

from llmctl.server.api import anthropic, responses_api
from llmctl.server.api.anthropic_models import MessagesRequest
from llmctl.server.api.chat_models import ChatCompletionRequest
from llmctl.server.api.prompts import anthropic_messages, chat_prompt, named_results, responses_messages
from llmctl.server.api.responses_models import ResponsesRequest
from llmctl.server.api.validation import parse_body
from llmctl.server.testing import build_tiny_model, serve_in_thread
from tests.conftest import make_service

TEMPLATES = Path(__file__).parent / "templates"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
CALLS = [("c1", "get_weather", {"city": "Paris"}), ("c2", "get_time", {"city": "Rome"})]
RESULTS = [("c1", "18 C"), ("c2", "noon")]

CHAT = {
    "messages": [
        {"role": "user", "content": "Weather in Paris and time in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}} for i, n, a in CALLS]},
        *[{"role": "tool", "tool_call_id": i, "content": r} for i, r in RESULTS],
        {"role": "user", "content": "Thanks. And tomorrow?"},
    ],
    "tools": [{"type": "function", "function": {"name": n, "parameters": SCHEMA}} for n in ("get_weather", "get_time")],
}
RESPONSES = {
    "input": [
        {"role": "user", "content": "Weather in Paris and time in Rome?"},
        *[{"type": "function_call", "call_id": i, "name": n, "arguments": json.dumps(a)} for i, n, a in CALLS],
        *[{"type": "function_call_output", "call_id": i, "output": r} for i, r in RESULTS],
        {"role": "user", "content": "Thanks. And tomorrow?"},
    ],
    "tools": [{"type": "function", "name": n, "parameters": SCHEMA} for n in ("get_weather", "get_time")],
}
ANTHROPIC = {
    "max_tokens": 5,
    "messages": [
        {"role": "user", "content": "Weather in Paris and time in Rome?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": i, "name": n, "input": a} for i, n, a in CALLS]},
        {"role": "user", "content": [*[{"type": "tool_result", "tool_use_id": i, "content": r} for i, r in RESULTS],
                                     {"type": "text", "text": "Thanks. And tomorrow?"}]},
    ],
    "tools": [{"name": n, "input_schema": SCHEMA} for n in ("get_weather", "get_time")],
}


def template_messages() -> dict[str, tuple[list[dict], list[dict] | None]]:
    """Each API's history as the template messages (and tools) its route renders."""
    chat = parse_body(ChatCompletionRequest, CHAT)
    responses = parse_body(ResponsesRequest, RESPONSES)
    messages = parse_body(MessagesRequest, ANTHROPIC)
    return {
        "chat": ([m.for_template() for m in chat.messages], chat.tools),
        "responses": ([m.for_template() for m in responses_messages(responses)],
                      responses_api.function_tools(responses)[0]),
        "anthropic": (anthropic_messages(messages), anthropic.chat_tools(messages)[0]),
    }


def test_results_are_named_after_their_calls():
    messages, _ = template_messages()["chat"]
    named = named_results(messages)
    assert [m.get("name") for m in named if m["role"] == "tool"] == ["get_weather", "get_time"]
    assert "name" not in messages[2]  # the request's own messages are left as they were


@pytest.mark.parametrize("family", sorted(p.stem for p in TEMPLATES.glob("*.jinja")))
def test_each_api_renders_the_same_history(tiny_model, family):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    rendered = {api: tokenizer.apply_chat_template(named_results(messages), tools=tools, tokenize=False,
                                                   add_generation_prompt=True)
                for api, (messages, tools) in template_messages().items()}
    assert rendered["responses"] == rendered["chat"] and rendered["anthropic"] == rendered["chat"], family
    # Arguments reach the template as objects (a template that writes them with tojson must not get a
    # JSON string of JSON), and both results are there.
    assert '\\"city\\"' not in rendered["chat"] and "Paris" in rendered["chat"]
    assert "18 C" in rendered["chat"] and "noon" in rendered["chat"]


def test_the_routes_count_the_same_prompt(tmp_path_factory):
    """Over HTTP: the three routes report the same prompt size for the history, on a template that prints it."""
    model = build_tiny_model(tmp_path_factory.mktemp("roomy") / "tiny-llama", context=2048)
    service = make_service(model, tool_call_parser="hermes")
    service.loaded.tokenizer.chat_template = (TEMPLATES / "openai.jinja").read_text()
    with serve_in_thread(service) as url, httpx.Client(base_url=url, timeout=60) as client:
        chat = client.post("/tokenize", json={**CHAT}).json()["count"]
        responses = client.post("/v1/responses", json={**RESPONSES, "max_output_tokens": 1, "store": False})
        messages = client.post("/v1/messages/count_tokens", json=ANTHROPIC)
        assert responses.status_code == 200 and messages.status_code == 200, (responses.text, messages.text)
        assert responses.json()["usage"]["input_tokens"] == chat == messages.json()["input_tokens"]
        text = client.post("/detokenize", json={"tokens": client.post("/tokenize", json=CHAT).json()["tokens"]})
        assert "functions.get_weather to=assistant" in text.json()["prompt"]  # the result names its call
    service.shutdown()


def test_mistral_templates_get_nine_character_call_ids(tiny_model):
    """Mistral's templates refuse ids that are not 9 letters and digits; each API's ids are mapped alike."""
    check = ('{%- for message in messages %}{%- for call in message.tool_calls or [] %}'
             '{%- if not (call.id is string and call.id | length == 9) %}'
             '{{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}'
             '{%- endif %}{%- endfor %}{%- endfor %}')
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = check + (TEMPLATES / "mistral.jinja").read_text()
    loaded = SimpleNamespace(tokenizer=tokenizer)
    long_ids = json.loads(json.dumps(CHAT).replace('"c1"', '"call_0a1b2c3d4e5f6a7b8c9d0e1f"')
                          )
    text = tokenizer.decode(chat_prompt(loaded, long_ids["messages"], long_ids["tools"]))
    assert text.count('"b8c9d0e1f"') == 2 and "call_0a1b" not in text  # the call and its result alike
    short = hashlib.sha256(b"c2").hexdigest()[:9]  # an id shorter than 9 is hashed
    assert text.count(short) == 2
    with pytest.raises(jinja2.TemplateError, match="length 9"):  # without the mapping the template refuses them
        tokenizer.apply_chat_template(long_ids["messages"], tools=long_ids["tools"], tokenize=False)
