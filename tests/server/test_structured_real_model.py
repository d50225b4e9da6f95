"""Structured outputs on the real embedded SmolLM2, through the clients agent backends use:
the openai SDK's parse() and LangChain's with_structured_output (json_schema, json_mode, function_calling)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from tests.conftest import REAL_MODEL

pytestmark = [*REAL_MODEL, pytest.mark.timeout(900)]
MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France, and its population? Answer in JSON."


class City(BaseModel):
    """A city and its country."""

    name: str = Field(description="the city's name", max_length=40)
    country: str = Field(description="the country it is in", max_length=40)
    # Bounded: an unbounded integer lets a small model write digits until max_tokens.
    population: int = Field(description="how many people live there", ge=0, le=10**10)


@pytest.fixture(scope="module")
def url():
    from llmctl.core.loader import LoadOptions
    from llmctl.server.service import Service, ServiceSettings
    from llmctl.server.testing import serve_in_thread

    service = Service(ServiceSettings(load=LoadOptions(), request_timeout=300))  # the embedded default model
    service.load()
    assert service.status == "ready", service.error
    with serve_in_thread(service) as base:
        yield base
    service.shutdown()


def test_openai_sdk_parse_returns_a_validated_object(url):
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    completion = sdk.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                            response_format=City, temperature=0, max_tokens=120)
    city = completion.choices[0].message.parsed
    assert isinstance(city, City) and city.name and city.population >= 0
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("method", ["json_schema", "json_mode", "function_calling"])
def test_langchain_with_structured_output(url, method):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=url + "/v1", api_key="unused", model=MODEL, temperature=0,
                                      max_tokens=200)
    structured = llm.with_structured_output(City, method=method)
    # json_mode sends no schema: as with OpenAI, the prompt must show the fields (a 135M model needs an example).
    prompt = QUESTION + (' Use this form: {"name": "...", "country": "...", "population": 0}'
                         if method == "json_mode" else "")
    city = structured.invoke(prompt)
    assert isinstance(city, City) and city.name and city.population >= 0


def test_grammar_bombs_are_400s_and_the_real_model_goes_on(url):
    """The openai SDK sends what took the server down before: each is a 400 naming its field, /health is not
    held up meanwhile, and a normal constrained request is served afterwards."""
    openai = pytest.importorskip("openai")
    from tests.conftest import while_health_answers
    from tests.server.test_grammar_bombs import MIN_ITEMS, SELF_REF

    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": QUESTION}]
    bombs = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": MIN_ITEMS}}},
         "response_format.json_schema.schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": SELF_REF}}],
          "tool_choice": "required"}, "tools[0].function.parameters"),
        ({"extra_body": {"structured_outputs": {"regex": "a{1000}{1000}"}}}, "structured_outputs.regex"),
    ]
    for fields, param in bombs:
        def send(fields=fields):
            with pytest.raises(openai.BadRequestError) as caught:
                sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, **fields)
            return caught.value
        error = while_health_answers(url, send)
        assert error.body["param"] == param and error.body["code"] == "grammar_too_large", error.body
    completion = sdk.chat.completions.parse(model=MODEL, messages=messages, response_format=City, temperature=0,
                                            max_tokens=120)
    assert isinstance(completion.choices[0].message.parsed, City)
