"""Agent frameworks that continue a turn by id, against a real server with a real (tiny) model: the OpenAI
Agents SDK (`previous_response_id`) and pydantic-ai (`openai_previous_response_id`, `openai_conversation_id`)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import scripted_server

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("store") / "responses.db"
    # Agent frameworks take an answer cut at max_output_tokens for a failure: the model says a short one.
    with scripted_server(tiny_model, f"sqlite:///{db}") as (url, say):
        say("Rome.")
        yield url, say


def test_agents_sdk_continues_by_previous_response_id(server):
    server, say = server
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)  # no traces to OpenAI's servers
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    agent = Agent(name="brief", instructions="Be brief.", model=OpenAIResponsesModel(MODEL, openai_client=client),
                  model_settings=ModelSettings(max_tokens=16, temperature=0))

    async def turns():
        say("Paris.")
        first = await Runner.run(agent, "The capital of France is")
        say("Rome.")
        second = await Runner.run(agent, "And of Italy?", previous_response_id=first.last_response_id)
        say("Rome.")
        alone = await Runner.run(agent, "And of Italy?")
        return first, second, alone

    first, second, alone = asyncio.run(turns())
    sdk = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    stored = sdk.responses.retrieve(second.last_response_id)
    assert stored.previous_response_id == first.last_response_id
    assert stored.output_text == second.final_output == "Rome."
    # The stored turn was read: the continuation's prompt holds it.
    assert stored.usage.input_tokens > sdk.responses.retrieve(alone.last_response_id).usage.input_tokens


def test_pydantic_ai_continues_by_previous_response_id_and_conversation(server):
    server, say = server
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel, OpenAIResponsesModelSettings
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIResponsesModel(MODEL, provider=OpenAIProvider(base_url=server + "/v1", api_key="unused"))
    agent = Agent(model, instructions="Be brief.")
    settings = OpenAIResponsesModelSettings(max_tokens=16, temperature=0, openai_previous_response_id="auto")
    say("Paris.")
    first = agent.run_sync("The capital of France is", model_settings=settings)
    say("Rome.")
    second = agent.run_sync("And of Italy?", message_history=first.all_messages(), model_settings=settings)
    sdk = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    first_id = first.all_messages()[-1].provider_response_id
    stored = sdk.responses.retrieve(second.all_messages()[-1].provider_response_id)
    assert stored.previous_response_id == first_id and second.output == "Rome."
    assert [i.content[0].text for i in sdk.responses.input_items.list(stored.id)] == ["And of Italy?"]

    conv = sdk.conversations.create()
    in_conv = OpenAIResponsesModelSettings(max_tokens=16, temperature=0, openai_conversation_id=conv.id)
    say("Hi.")
    agent.run_sync("Hello", model_settings=in_conv)
    say("Hi again.")
    assert agent.run_sync("Again", model_settings=in_conv).output == "Hi again."
    roles = [item.role for item in sdk.conversations.items.list(conv.id, order="asc")]
    assert roles == ["user", "assistant", "user", "assistant"]
