"""Every response carries an x-request-id (the client's own when it sent one), named in its log line and error
body, so that the SDKs' request_id ties a client's error to the server's log. Real server, real SDKs."""

from __future__ import annotations

import logging

import anthropic
import openai
import pytest

USER = [{"role": "user", "content": "Hello there"}]


def test_the_sdks_see_the_id_of_each_answer_and_error(base_url, caplog):
    oai = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
    with caplog.at_level(logging.INFO, logger="llmctl.server.app"):
        raw = oai.chat.completions.with_raw_response.create(model="tiny-llama", messages=USER, max_tokens=2)
    rid = raw.headers["x-request-id"]
    assert rid.startswith("req_") and raw.parse()._request_id == rid
    assert any(rid in r.getMessage() and "POST /v1/chat/completions 200" in r.getMessage() for r in caplog.records)
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=-1)
    assert bad.value.request_id and bad.value.request_id.startswith("req_") and bad.value.request_id != rid
    assert bad.value.body["request_id"] == bad.value.request_id  # the SDK's body is the error object
    claude = anthropic.Anthropic(base_url=base_url, api_key="none", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as bad_anthropic:
        claude.messages.create(model="tiny-llama", messages=[], max_tokens=2)
    assert bad_anthropic.value.request_id == bad_anthropic.value.body["request_id"]


def test_a_clients_own_id_is_kept_and_a_bad_one_replaced(client):
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2},
                    headers={"x-request-id": "agent-7/step-3"})
    assert r.headers["x-request-id"] == "agent-7/step-3"
    r = client.post("/v1/chat/completions", json={"messages": "not a list"}, headers={"x-request-id": "a b"})
    assert r.status_code == 400 and r.headers["x-request-id"].startswith("req_")
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    for path in ("/health", "/v1/models", "/nowhere"):
        assert client.get(path).headers["x-request-id"].startswith("req_")
    body = {"messages": USER, "max_tokens": 2, "stream": True}
    streamed = client.build_request("POST", "/v1/chat/completions", json=body, headers={"x-request-id": "stream-1"})
    response = client.send(streamed, stream=True)
    assert response.headers["x-request-id"] == "stream-1"
    response.read()
    response.close()
