"""Three llmctl replicas on three hosts (network namespaces) behind vLLM's router, started by `llmctl router`.

Needs root and iproute2 (CI has both); elsewhere it skips and says why.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random

import httpx
import openai
import pytest
from typer.testing import CliRunner

from llmctl.cli.app import app
from llmctl.server.testing import build_tiny_model
from tests.cluster import hosts as cluster_hosts
from tests.conftest import wait_for

KEY = "cluster-test-key"
MISSING = cluster_hosts.missing_requirement()
if MISSING and os.environ.get("CI"):
    pytest.fail(f"CI must run the cluster tests, but {MISSING}", pytrace=False)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"cluster tests: {MISSING}")
WORDS = ("capital France Paris Italy Rome quick brown fox jumps over lazy dog sea calm blue "
         "system user assistant tool messages tokens stream chat model server request").split()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    model = build_tiny_model(folder / "tiny-agent", context=2048)
    logs = folder / "logs"
    logs.mkdir()
    with cluster_hosts.cluster(model, logs, KEY) as made:
        yield made


def sdk(url: str) -> openai.OpenAI:
    # No retries in the client: every retry seen here is the router's.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def worker_metrics(host: cluster_hosts.Host) -> dict:
    r = httpx.get(f"{host.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200
    return r.json()


def prefix_totals(cluster) -> tuple[int, int]:
    """Prompt tokens looked up in, and found in, the replicas' prefix caches, summed."""
    caches = [worker_metrics(h)["prefix_cache"] for h in cluster.hosts]
    return sum(c["queries_tokens_total"] for c in caches), sum(c["hits_tokens_total"] for c in caches)


def chat_counts(cluster) -> list[int]:
    return [worker_metrics(h)["requests_by_route"].get("/v1/chat/completions", 0) for h in cluster.hosts]


def agent_workload(client: openai.OpenAI, salt: str, agents: int = 2, sessions: int = 2, turns: int = 5) -> int:
    """Agents, each with its own long system prompt, hold multi-turn sessions that interleave (4 sessions:
    not a multiple of 3, so round-robin moves each session between replicas). Returns the requests sent."""
    conversations = []
    for a in range(agents):
        # Each agent's instructions are its own word sequence, so a router can tell the agents apart.
        words = random.Random(f"{salt}-{a}").choices(WORDS, k=90)
        system = f"You are agent {a} of {salt}. " + " ".join(words)
        for s in range(sessions):
            conversations.append([{"role": "system", "content": system},
                                  {"role": "user", "content": f"session {s} " + " ".join(WORDS[s:s + 12])}])
    sent = 0

    def step(messages: list[dict], turn: int) -> None:
        reply = client.chat.completions.create(model="tiny-agent", messages=messages, max_tokens=8, temperature=0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        messages.append({"role": "user", "content": f"turn {turn} " + " ".join(WORDS[turn:turn + 10])})

    # The sessions start one after another: whether a session's first request finds its agent's instructions
    # cached must not depend on which of two requests sent at once a busy machine prefills first (an agent's
    # second session finds them where the first one went, as in an agent backend whose sessions start over time).
    for conversation in conversations:
        step(conversation, 0)
        sent += 1
    # Then the sessions' turns run at once, as an agent backend's users do: a router sees them in flight.
    with concurrent.futures.ThreadPoolExecutor(len(conversations)) as pool:
        for turn in range(1, turns):
            list(pool.map(step, conversations, [turn] * len(conversations)))
            sent += len(conversations)
    return sent


def hit_rate(cluster, client: openai.OpenAI, salt: str) -> float:
    before = prefix_totals(cluster)
    agent_workload(client, salt)
    after = prefix_totals(cluster)
    return (after[1] - before[1]) / (after[0] - before[0])


def test_openai_sdk_through_the_router(cluster):
    url, _ = cluster.start_router("cache_aware")
    client = sdk(url)
    assert [m.id for m in client.models.list().data] == ["tiny-agent"]
    reply = client.chat.completions.create(model="tiny-agent", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 5
    chunks = list(client.chat.completions.create(model="tiny-agent", stream=True, max_tokens=5,
                                                 messages=[{"role": "user", "content": "hello"}]))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # The router passes the client's key through; the replicas check it.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="tiny-agent", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    # What the router reads of each replica: /get_load (power_of_two) and /get_model_info.
    loads = httpx.get(f"{url}/get_loads", timeout=10).json()["workers"]
    assert sorted(w["worker"] for w in loads) == sorted(h.url for h in cluster.hosts)
    assert all(w["load"] == 0 for w in loads)
    # What deploy/k8s/router.yaml probes.
    assert httpx.get(f"{url}/readiness", timeout=10).json()["healthy_workers"] == 3
    assert httpx.get(f"{url}/liveness", timeout=10).status_code == 200
    info = httpx.get(f"{url}/get_model_info", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert info["served_model_name"] == "tiny-agent"


def test_cache_aware_keeps_one_replicas_prefix_hits_and_round_robin_loses_them(cluster):
    single = hit_rate(cluster, sdk(cluster.hosts[0].url), "alone")
    cache_aware_url, _ = cluster.start_router("cache_aware")
    before = chat_counts(cluster)
    cache_aware = hit_rate(cluster, sdk(cache_aware_url), "routed")
    spread = [a - b for a, b in zip(chat_counts(cluster), before, strict=False)]
    round_robin_url, _ = cluster.start_router("round_robin")
    round_robin = hit_rate(cluster, sdk(round_robin_url), "rotated")
    print(f"\nprefix-cache hit rate: one replica {single:.3f}, cache_aware {cache_aware:.3f}, "
          f"round_robin {round_robin:.3f}; cache_aware requests per replica {spread}")
    assert cache_aware >= single - 0.05
    assert round_robin <= cache_aware - 0.15
    assert sum(spread) == 20


def test_bench_through_the_router_reports_each_replicas_share(cluster):
    url, _ = cluster.start_router("cache_aware")
    args = ["bench", "--url", url, "--api-key", KEY, "--concurrency", "4", "--requests", "8", "--max-tokens", "4",
            "--prompt-tokens", "8", "--shared-prefix-tokens", "60", "--warmup", "2", "--json"]
    for host in cluster.hosts:
        args += ["--worker-url", host.url]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    workers = json.loads(result.stdout)["workers"]
    assert [w["url"] for w in workers] == [h.url for h in cluster.hosts]
    assert sum(w["requests"] for w in workers) == 8
    assert sum(w["share"] for w in workers) == pytest.approx(1.0)
    print(f"\nbench through the router (cache_aware): requests per replica {[w['requests'] for w in workers]}")


def test_a_killed_replica_is_taken_out_and_used_again_when_back(cluster):
    url, router_metrics = cluster.start_router("round_robin")
    client = sdk(url)
    victim = cluster.hosts[1]
    messages = [{"role": "user", "content": "count " + " ".join(WORDS)}]

    def ask(i: int, tokens: int = 600):  # long enough to be seen running: a tiny model's step takes ~1 ms
        return client.chat.completions.create(model="tiny-agent", messages=messages + [
            {"role": "user", "content": f"request {i}"}], max_tokens=tokens, temperature=0,
            extra_body={"ignore_eos": True})

    # The router takes a replica in once its health check has passed: until the victim has answered a request
    # through it, round robin may send the whole burst to the other replica (bounded: 20 short requests).
    def served(host) -> int:
        return worker_metrics(host)["requests_by_route"].get("/v1/chat/completions", 0)

    start = served(victim)
    for i in range(20):
        if served(victim) > start:
            break
        ask(200 + i, 1)
    assert served(victim) > start, "the router never sent the victim a request"

    def victim_load() -> int:
        return httpx.get(f"{victim.url}/get_load", timeout=5).json()["load"]

    futures: list[concurrent.futures.Future] = []
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        # Round robin gives the victim every third request while the router counts it healthy; should a wave
        # of 12 pass it by, a second one is sent (at most 24 requests in all).
        for _ in range(2):
            futures += [pool.submit(ask, len(futures) + i) for i in range(12)]
            if wait_for(lambda: victim_load() > 0, timeout=60):
                break
        else:
            loads = httpx.get(f"{url}/get_loads", timeout=10).text
            pytest.fail(f"the victim never held a request: it served {served(victim) - start} since the warm-up; "
                        f"the router's loads {loads}; its log:\n{cluster.router_log_tail(url)}")
        cluster.kill_worker(victim)
        answers = [f.result() for f in futures]
    # Every request answered once, in full: those the dead replica held were retried on the others.
    assert len({a.id for a in answers}) == len(futures)
    assert all(a.usage.completion_tokens == 600 and len(a.choices) == 1 for a in answers)
    # The dead replica did hold requests: the router moved them (its own count of retries).
    retried = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(router_metrics, timeout=10).text.splitlines()
                  if line.startswith("vllm_router_retries_total"))
    assert retried >= 1
    print(f"\nreplica killed with {len(futures)} requests in flight through the router: {retried:.0f} retried by "
          f"the router, {len(futures) - len(answers)} lost, {len(answers) - len({a.id for a in answers})} duplicated")

    def router_health() -> httpx.Response:
        return httpx.get(f"{url}/health", timeout=5)

    assert wait_for(lambda: router_health().status_code == 503, timeout=30)
    assert victim.url in router_health().text
    survivors = [h for h in cluster.hosts if h is not victim]
    before = [worker_metrics(h)["requests_by_route"]["/v1/chat/completions"] for h in survivors]
    for i in range(6):
        ask(100 + i, 4)
    after = [worker_metrics(h)["requests_by_route"]["/v1/chat/completions"] for h in survivors]
    assert sum(after) - sum(before) == 6

    cluster.start_worker(victim)
    cluster.wait_ready(victim)
    assert wait_for(lambda: router_health().status_code == 200, timeout=30)
    for i in range(6):
        ask(200 + i, 4)
    assert worker_metrics(victim)["requests_by_route"]["/v1/chat/completions"] >= 1


def test_replicas_health_and_metrics_stay_correct(cluster):
    for host in cluster.hosts:
        health = httpx.get(f"{host.url}/health", timeout=5).json()
        assert health["status"] == "ready" and health["running"] == 0 and health["waiting"] == 0
        metrics = worker_metrics(host)
        assert metrics["running"] == 0 and metrics["waiting"] == 0
        assert not [status for status in metrics["requests_by_status"] if status.startswith("5")]
        text = httpx.get(f"{host.url}/metrics?format=prometheus", timeout=5,
                         headers={"Authorization": f"Bearer {KEY}"}).text
        chats = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith('llmctl_requests_total{route="/v1/chat/completions"'))
        assert chats == metrics["requests_by_route"]["/v1/chat/completions"] > 0
