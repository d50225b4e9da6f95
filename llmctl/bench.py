"""The core of `llmctl bench`: a load generator of streamed chat completions, and its metrics."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from httpx_sse import SSEError, aconnect_sse

from llmctl.errors import LLMCtlError

Messages = list[dict]

# Common English words that each encode as one token (with their leading space) in the BPE tokenizers
# of SmolLM2, GPT-2 and Llama-family models, so N words make a prompt of about N tokens.
WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "team minute idea body information back parent face level office door health person art war history "
    "party result change morning reason research girl moment air teacher force education foot boy age policy "
    "process music market sense nation plan college interest death experience effect class control care field "
    "role effort rate heart show leader light voice police mind price report decision son view town road arm "
    "value building action model season society tax director position player record paper space ground form "
    "event matter center couple site project activity star table need court oil situation cost industry "
    "figure street image phone data picture practice piece land product doctor wall patient worker news test "
    "movie north love support technology step baby computer type attention film tree source hair window"
).split()


class BenchError(LLMCtlError):
    """A benchmark that cannot run as asked (unreachable server, bad prompts file, bad flags)."""


# ---- prompts ---------------------------------------------------------------------------------
class BuiltinPrompts(Sequence[Messages]):
    """``count`` single-message prompts of ``tokens`` words (about one token each), made on demand.

    Prompt i comes from its own generator seeded with (seed, offset + i), so it is the same in every
    run and every process however many prompts are asked for, and a long run costs no memory.
    """

    def __init__(self, count: int, tokens: int, seed: int = 0, offset: int = 0) -> None:
        self.count, self.tokens, self.seed, self.offset = max(1, count), max(1, tokens), seed, offset

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        rng = random.Random(f"llmctl-bench/{self.seed}/{self.offset + index % self.count}")
        return [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(self.tokens))}]


def builtin_prompts(count: int, tokens: int, seed: int = 0, offset: int = 0) -> BuiltinPrompts:
    """The built-in prompt set: prompts ``offset`` to ``offset + count - 1`` of the seeded sequence."""
    return BuiltinPrompts(count, tokens, seed, offset)


def load_prompts(path: Path) -> list[Messages]:
    """Prompts from a JSONL file: one object a line, {"prompt": "..."} or {"messages": [...]}."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BenchError(f"Cannot read the prompts file {path}: {exc.strerror or exc}.") from None
    prompts: list[Messages] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path}:{number} is not valid JSON: {exc.msg}.") from None
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append([{"role": "user", "content": item["prompt"]}])
        elif isinstance(item, dict) and isinstance(item.get("messages"), list) and item["messages"]:
            prompts.append(item["messages"])
        else:
            raise BenchError(f'{path}:{number} needs a "prompt" string or a non-empty "messages" list.')
    if not prompts:
        raise BenchError(f"The prompts file {path} holds no prompts.")
    return prompts


# ---- per-request results and the summary of a level -------------------------------------------
@dataclass
class RequestResult:
    """What one streamed request did. Times are in seconds from the moment the request was sent."""

    success: bool = False
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    usage_from_server: bool = False
    finish_reason: str | None = None

    @property
    def counted_by(self) -> str:
        """Where completion_tokens comes from: the server's usage; finish_reason "length", which means
        exactly max_tokens; or, failing both, the content chunks (a chunk may hold several tokens)."""
        return "usage" if self.usage_from_server else "length" if self.finish_reason == "length" else "chunks"

    def stopped_early(self, max_tokens: int) -> bool:
        """Whether the response ended before max_tokens (end-of-sequence), so it is not full length."""
        if self.finish_reason == "stop":
            return True
        return self.finish_reason != "length" and self.completion_tokens < max_tokens


@dataclass(frozen=True)
class Stats:
    """Mean, median, 95th and 99th percentile of one latency metric, in milliseconds (None: no data)."""

    mean: float | None = None
    median: float | None = None
    p95: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        if not seconds:
            return cls()
        ms = sorted(s * 1000.0 for s in seconds)
        return cls(sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 95), percentile(ms, 99))


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on already sorted values."""
    rank = (len(sorted_values) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


@dataclass(frozen=True)
class LevelSummary:
    """The summary of one concurrency level against one endpoint."""

    concurrency: int
    requests: int
    completed: int
    failed: int
    cancelled: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    prompt_tokens: int
    prompt_tokens_mean: float | None
    completion_tokens: int
    completion_tokens_min: int | None
    completion_tokens_mean: float | None
    completion_tokens_max: int | None
    max_tokens: int | None
    short_completions: int
    usage_source: str | None
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    errors: dict[str, int]
    time_limited: bool = False


def summarize(results: Sequence[RequestResult], duration: float, *, concurrency: int = 0,
              max_tokens: int | None = None, cancelled: int = 0, time_limited: bool = False) -> LevelSummary:
    """Summarize one level, with the definitions of vLLM's serving benchmark.

    Only successful requests count towards tokens and latencies; prompt tokens are known only from
    the server's usage. A response stopped early if its finish_reason is "stop", or if it has neither
    finish_reason "length" nor max_tokens tokens. TPOT of a request is
    (latency - TTFT) / (completion tokens - 1), for requests with more than one token; ITL pools
    every gap between content chunks of every request.
    """
    ok = [r for r in results if r.success]
    lengths = [r.completion_tokens for r in ok]
    out_tokens = sum(lengths)
    known_prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    in_tokens = sum(known_prompts)
    per_second = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    tpots = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in ok
             if r.completion_tokens > 1 and r.ttft is not None and r.latency is not None]
    counted = {r.counted_by for r in ok}
    usage_source = (None if not ok else "server" if counted == {"usage"}
                    else "chunks" if counted == {"chunks"} else "mixed" if "chunks" in counted else "length")
    errors = Counter(r.error or "unknown error" for r in results if not r.success)
    return LevelSummary(
        concurrency=concurrency,
        requests=len(results) + cancelled,
        completed=len(ok),
        failed=len(results) - len(ok),
        cancelled=cancelled,
        duration_s=duration,
        request_throughput=per_second(len(ok)),
        output_throughput=per_second(out_tokens),
        total_token_throughput=per_second(out_tokens + in_tokens),
        prompt_tokens=in_tokens,
        prompt_tokens_mean=in_tokens / len(known_prompts) if known_prompts else None,
        completion_tokens=out_tokens,
        completion_tokens_min=min(lengths) if lengths else None,
        completion_tokens_mean=out_tokens / len(lengths) if lengths else None,
        completion_tokens_max=max(lengths) if lengths else None,
        max_tokens=max_tokens,
        short_completions=sum(r.stopped_early(max_tokens) for r in ok) if max_tokens else 0,
        usage_source=usage_source,
        ttft_ms=Stats.of([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=Stats.of(tpots),
        itl_ms=Stats.of([gap for r in ok for gap in r.itl]),
        e2e_ms=Stats.of([r.latency for r in ok if r.latency is not None]),
        errors=dict(errors.most_common(5)),
        time_limited=time_limited,
    )


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


def normalize_url(url: str) -> str:
    """The server root: accepts ``http://host:port``, with or without a trailing ``/v1``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url.removesuffix("/v1")


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


async def _run_plan(plan: BenchPlan, state: _RunState, progress: ProgressFn | None) -> None:
    workload = plan.workload
    timeout = httpx.Timeout(workload.request_timeout, connect=10.0)
    connections = max(plan.concurrency) + 8
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    clients = [httpx.AsyncClient(timeout=timeout, limits=limits) for _ in plan.endpoints]
    starts = plan.prompt_starts()
    try:
        for endpoint, client in zip(plan.endpoints, clients):
            await _warm_up(client, endpoint, workload, plan.warmup)
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


def run_benchmark(plan: BenchPlan, progress: ProgressFn | None = None) -> tuple[list[EndpointRun], bool]:
    """Run ``plan``; on Ctrl-C (KeyboardInterrupt) return what finished, with the level in progress.

    Returns the runs, one per endpoint, and whether the run was interrupted.
    """
    if not plan.concurrency or min(plan.concurrency) < 1:
        raise BenchError("--concurrency needs one or more positive integers, e.g. 1,4,16.")
    endpoints = [resolve_model(e) for e in plan.endpoints]
    plan = BenchPlan(endpoints, plan.workload, plan.concurrency, plan.requests, plan.warmup, plan.time_limit)
    state = _RunState([EndpointRun(e.label, e.base, e.model) for e in endpoints])
    try:
        asyncio.run(_run_plan(plan, state, progress))
    except KeyboardInterrupt:
        state.interrupted = True
        if state.current is not None:
            e, level = state.current
            state.runs[e].levels.append(level.summary(plan.workload.max_tokens))
    return state.runs, state.interrupted
