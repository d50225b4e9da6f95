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
