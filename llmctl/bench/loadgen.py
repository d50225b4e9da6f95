"""The core of `llmctl bench`: a load generator of streamed chat completions, and its metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
from httpx_sse import SSEError, aconnect_sse

from llmctl.bench.prompts import BenchError, Messages
from llmctl.bench.stats import LevelSummary, RequestResult, summarize
from llmctl.client.config import normalize_url


# ---- the workload and one request -------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server to benchmark."""

    url: str
    model: str | None = None
    api_key: str | None = None
    label: str = "A"

    @property
    def base(self) -> str:
        return normalize_url(self.url)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class Workload:
    """What every request asks for; the same for every endpoint and level."""

    prompts: Sequence[Messages]
    max_tokens: int = 128
    temperature: float = 0.0
    ignore_eos: bool = True
    eos_bias_ids: tuple[int, ...] = ()
    request_timeout: float = 300.0
    warmup_prompts: Sequence[Messages] = ()  # default: the first prompts

    def body(self, model: str | None, messages: Messages) -> dict:
        body: dict = {"messages": messages, "max_tokens": self.max_tokens, "temperature": self.temperature,
                      "stream": True, "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.eos_bias_ids:
            body["logit_bias"] = {str(i): -100 for i in self.eos_bias_ids}
        return body


async def send_request(client: httpx.AsyncClient, endpoint: Endpoint, workload: Workload,
                       messages: Messages) -> RequestResult:
    """Send one streaming chat completion and time its chunks (never raises for server or network errors)."""
    result = RequestResult()
    chunks = 0
    ended = False
    start = time.perf_counter()
    last_content = last_event = None
    try:
        async with aconnect_sse(client, "POST", endpoint.base + "/v1/chat/completions", headers=endpoint.headers(),
                                json=workload.body(endpoint.model, messages)) as source:
            if source.response.status_code != 200:
                await source.response.aread()
                result.error = http_error(source.response)
                return result
            async for event in source.aiter_sse():
                if event.data.strip() == "[DONE]":
                    ended = True
                    break
                now = time.perf_counter()
                data = json.loads(event.data)
                if isinstance(data, dict) and data.get("error"):
                    error = data["error"]
                    message = error.get("message", error) if isinstance(error, dict) else error
                    result.error = f"in-stream error: {message}"
                    return result
                for choice in data.get("choices") or []:
                    delta = choice.get("delta") or {}
                    result.text += delta.get("content") or ""
                    if delta.get("content") or delta.get("reasoning_content"):
                        if last_content is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last_content)
                        last_content = now
                        chunks += 1
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
                usage = data.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                    result.completion_tokens = usage["completion_tokens"]
                    result.usage_from_server = True
                last_event = now
    except (httpx.HTTPError, SSEError) as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return result
    except (json.JSONDecodeError, AttributeError, TypeError):
        result.error = "the server sent a stream chunk that is not a chat completion chunk"
        return result
    if last_event is None or not (ended or result.finish_reason):
        result.error = "the stream ended without any chunk" if last_event is None else "the stream broke off"
        return result
    if not result.usage_from_server:
        # Without usage, finish_reason "length" still says the response ran to max_tokens; chunks can
        # undercount, as a server may put several tokens in one chunk.
        result.completion_tokens = workload.max_tokens if result.finish_reason == "length" else chunks
    result.latency = last_event - start
    result.success = True
    return result


def http_error(response: httpx.Response) -> str:
    """``HTTP 429: message`` from an OpenAI error envelope, or the start of the body."""
    try:
        message = response.json()["error"]["message"]
    except Exception:
        message = response.text.strip()[:200] or response.reason_phrase
    return f"HTTP {response.status_code}: {message}"


# ---- levels and runs ---------------------------------------------------------------------------
# progress(label, concurrency, requests planned for the level, the result that just finished)
ProgressFn = Callable[[str, int, int, RequestResult], None]


@dataclass
class _Level:
    """Results of the level in progress, readable after an interruption."""

    concurrency: int
    requests: int
    first_prompt: int = 0  # this level's requests use prompts first_prompt, first_prompt + 1, ...
    results: list[RequestResult] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None

    def summary(self, max_tokens: int, time_limited: bool = False) -> LevelSummary:
        duration = (self.ended or time.perf_counter()) - self.started
        return summarize(self.results, duration, concurrency=self.concurrency, max_tokens=max_tokens,
                         cancelled=self.requests - len(self.results), time_limited=time_limited)


async def run_level(client: httpx.AsyncClient, endpoint: Endpoint, workload: Workload, level: _Level,
                    time_limit: float | None = None, progress: ProgressFn | None = None) -> bool:
    """Send ``level.requests`` requests, ``level.concurrency`` at a time; True if the time limit cut it short."""
    indices = iter(range(level.requests))

    async def worker() -> None:
        for index in indices:
            messages = workload.prompts[(level.first_prompt + index) % len(workload.prompts)]
            result = await send_request(client, endpoint, workload, messages)
            level.results.append(result)
            if progress is not None:
                progress(endpoint.label, level.concurrency, level.requests, result)

    level.started = time.perf_counter()
    tasks = [asyncio.create_task(worker()) for _ in range(min(level.concurrency, level.requests))]
    try:
        _, pending = await asyncio.wait(tasks, timeout=time_limit)
    except asyncio.CancelledError:  # Ctrl-C: requests in flight are cancelled, not failed
        pending = set(tasks)
        raise
    finally:
        level.ended = time.perf_counter()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return bool(pending)


@dataclass
class EndpointRun:
    """Every level measured against one endpoint."""

    label: str
    url: str
    model: str | None
    levels: list[LevelSummary] = field(default_factory=list)


@dataclass
class BenchPlan:
    """What to run: endpoints, levels, request counts, warm-up and limits."""

    endpoints: list[Endpoint]
    workload: Workload
    concurrency: list[int]
    requests: int | None = None
    warmup: int = 2
    time_limit: float | None = None

    def requests_for(self, concurrency: int) -> int:
        """Requests per level: as asked, else 4 per concurrent stream (at least 8)."""
        return self.requests if self.requests else max(8, 4 * concurrency)

    def prompt_starts(self) -> list[int]:
        """Where each level starts in the prompt sequence: every level gets prompts of its own, so a
        server with a prefix cache gains nothing at one level from what an earlier level sent."""
        starts, total = [], 0
        for concurrency in self.concurrency:
            starts.append(total)
            total += self.requests_for(concurrency)
        return starts

    def prompt_count(self) -> int:
        """Prompts the built-in set needs: one per request of every level."""
        return sum(self.requests_for(c) for c in self.concurrency)


def resolve_model(endpoint: Endpoint, timeout: float = 10.0) -> Endpoint:
    """The endpoint with its model name filled in from GET /v1/models when none was given."""
    if endpoint.model:
        return endpoint
    try:
        response = httpx.get(endpoint.base + "/v1/models", headers=endpoint.headers(), timeout=timeout)
    except httpx.HTTPError as exc:
        raise BenchError(f"Cannot reach {endpoint.base}: {exc}. Is the server running?") from None
    if response.status_code != 200:
        raise BenchError(f"GET {endpoint.base}/v1/models failed with {http_error(response)}")
    try:
        model = response.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"{endpoint.base}/v1/models lists no model; pass --model.") from None
    return Endpoint(endpoint.url, model, endpoint.api_key, endpoint.label)


@dataclass
class _RunState:
    runs: list[EndpointRun]
    current: tuple[int, _Level] | None = None
    interrupted: bool = False


async def _run_plan(plan: BenchPlan, state: _RunState, progress: ProgressFn | None,
                    warmed: Callable[[], None] | None = None) -> None:
    workload = plan.workload
    timeout = httpx.Timeout(workload.request_timeout, connect=10.0)
    connections = max(plan.concurrency) + 8
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    clients = [httpx.AsyncClient(timeout=timeout, limits=limits) for _ in plan.endpoints]
    starts = plan.prompt_starts()
    try:
        for endpoint, client in zip(plan.endpoints, clients, strict=False):
            await _warm_up(client, endpoint, workload, plan.warmup)
        if warmed is not None:
            warmed()
        for i, concurrency in enumerate(plan.concurrency):
            # ABBA order, so a drift of the machine over time weighs on both endpoints alike.
            order = list(range(len(plan.endpoints)))
            for e in order if i % 2 == 0 else order[::-1]:
                level = _Level(concurrency, plan.requests_for(concurrency), starts[i])
                state.current = (e, level)
                limited = await run_level(clients[e], plan.endpoints[e], workload, level, plan.time_limit, progress)
                state.runs[e].levels.append(level.summary(workload.max_tokens, limited))
                state.current = None
    finally:
        for client in clients:
            await client.aclose()


async def _warm_up(client: httpx.AsyncClient, endpoint: Endpoint, workload: Workload, count: int) -> None:
    if count < 1:
        return
    prompts = workload.warmup_prompts or workload.prompts
    results = await asyncio.gather(*(send_request(client, endpoint, workload, prompts[i % len(prompts)])
                                     for i in range(count)))
    if not any(r.success for r in results):
        raise BenchError(f"Every warm-up request to {endpoint.base} failed: {results[0].error}")


def run_benchmark(plan: BenchPlan, progress: ProgressFn | None = None,
                  warmed: Callable[[], None] | None = None) -> tuple[list[EndpointRun], bool]:
    """Run ``plan``; on Ctrl-C (KeyboardInterrupt) return what finished, with the level in progress.

    ``warmed`` is called once the warm-up requests are answered, before the first measured level.

    Returns the runs, one per endpoint, and whether the run was interrupted.
    """
    if not plan.concurrency or min(plan.concurrency) < 1:
        raise BenchError("--concurrency needs one or more positive integers, e.g. 1,4,16.")
    endpoints = [resolve_model(e) for e in plan.endpoints]
    plan = BenchPlan(endpoints, plan.workload, plan.concurrency, plan.requests, plan.warmup, plan.time_limit)
    state = _RunState([EndpointRun(e.label, e.base, e.model) for e in endpoints])
    try:
        asyncio.run(_run_plan(plan, state, progress, warmed))
    except KeyboardInterrupt:
        state.interrupted = True
        if state.current is not None:
            e, level = state.current
            state.runs[e].levels.append(level.summary(plan.workload.max_tokens))
    return state.runs, state.interrupted
