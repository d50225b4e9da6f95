"""`kill -9` of a real `llmctl serve` process while it stores responses under load: the SQLite file opens,
holds every response the clients got, and a restarted server serves them and fails the background response
the dead one was running."""

from __future__ import annotations

import sqlite3
import threading

import httpx
import openai

from llmctl.server.store import SQLStore
from llmctl.server.store.state import CRASHED
from tests.conftest import stored_serving, wait_for

MODEL = "tiny-llama"


def test_kill_9_under_load_loses_no_answered_response(tiny_model, tmp_path, server_process):
    url = f"sqlite:///{tmp_path / 'responses.db'}"
    args = ("--model-path", str(tiny_model), "--dtype", "float32", "--device", "cpu", "--responses-store", url)
    env = {"LLMCTL_RESPONSES_LEASE": "0.3"}
    first = server_process(*args, env=env)
    first.wait_status("ready")
    answered: list[str] = []
    stop = threading.Event()

    def write() -> None:
        with httpx.Client(base_url=first.url, timeout=30) as client:
            for _ in range(500):  # bounded; the kill ends it long before
                if stop.is_set():
                    return
                try:
                    r = client.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 4})
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 200:
                    answered.append(r.json()["id"])

    writers = [threading.Thread(target=write) for _ in range(8)]
    for writer in writers:
        writer.start()
    sdk = openai.OpenAI(base_url=first.url + "/v1", api_key="unused", max_retries=0)
    assert wait_for(lambda: len(answered) >= 40, 120)
    job = sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=240, background=True,
                               extra_body={"ignore_eos": True})
    assert wait_for(lambda: sdk.responses.retrieve(job.id).status == "in_progress", 30)
    first.proc.kill()  # SIGKILL: no shutdown code runs
    first.proc.wait()
    stop.set()
    for writer in writers:
        writer.join()

    db = sqlite3.connect(tmp_path / "responses.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    store = SQLStore(url)
    assert [rid for rid in answered if store.get_response(rid, "") is None] == []
    assert store.get_response(job.id, "").status == "in_progress"  # the kill left it unfinished
    store.close()

    # The restarted server (in this process, to keep the test short) on the same file.
    with stored_serving(tiny_model, url) as (_, second):
        sdk = openai.OpenAI(base_url=second + "/v1", api_key="unused", max_retries=0)
        assert sdk.responses.retrieve(answered[0]).id == answered[0]  # a restart keeps stored responses
        assert wait_for(lambda: sdk.responses.retrieve(job.id).status == "failed", 30)
        assert sdk.responses.retrieve(job.id).error.message == CRASHED
