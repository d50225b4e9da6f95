"""What a request router in front of several replicas asks of each: /get_load and /get_model_info."""

from __future__ import annotations

import concurrent.futures

import httpx

from llmctl.engine import EngineConfig
from llmctl.server.api import status
from llmctl.server.testing import serve_in_thread
from tests.conftest import slow_serving, wait_for

KEY = "router-test-key"


def test_get_load_counts_running_and_waiting_sequences(tiny_model):
    # One slot, so that of three requests one runs and two wait while the test reads the load.
    engine = EngineConfig(max_num_seqs=1, max_waiting=8, kv_cache_tokens=4096)
    with slow_serving(tiny_model, 0.05, engine) as (_, url), httpx.Client(base_url=url, timeout=60) as client:
        idle = client.get("/get_load")
        assert idle.status_code == 200
        assert status.WorkerLoad.model_validate(idle.json()).load == 0
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(client.post, "/v1/chat/completions", json=body) for _ in range(3)]
            assert wait_for(lambda: client.get("/get_load").json()["load"] == 3, timeout=30)
            busy = client.get("/get_load").json()
            assert busy == {"load": 3, "running": 1, "waiting": 2}
            assert all(f.result().status_code == 200 for f in futures)
        # The engine lets go of a finished row just after its answer is sent.
        assert wait_for(lambda: client.get("/get_load").json() == {"load": 0, "running": 0, "waiting": 0},
                        timeout=30)


def test_get_model_info_names_the_served_model(client, tiny_service):
    r = client.get("/get_model_info")
    assert r.status_code == 200
    info = status.ModelInfo.model_validate(r.json())
    assert info.model_path == info.served_model_name == "tiny-llama"
    assert info.is_generation and info.context_length == tiny_service.loaded.context_length


def test_get_load_is_open_and_model_info_needs_the_key(tiny_service):
    """A router polls /get_load without the clients' key (as /health); /get_model_info gets the client's."""
    with serve_in_thread(tiny_service, api_keys=(KEY,)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/get_load").status_code == 200
        denied = client.get("/get_model_info")
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        allowed = client.get("/get_model_info", headers={"Authorization": f"Bearer {KEY}"})
        assert allowed.status_code == 200 and allowed.json()["served_model_name"] == "tiny-llama"
