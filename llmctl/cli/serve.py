"""`llmctl serve`: the OpenAI-compatible chat service.

The preflight (paths, config, shards, tokenizer, the port) runs before torch is imported, so a
mistake is reported in well under a second; torch, transformers and the server load after it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from llmctl import envvars
from llmctl.cli.options import ConfigOpt, ModelPathOpt
from llmctl.client.config import configured_model_path
from llmctl.core.adapters import DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS, AdapterSpec, check_adapters
from llmctl.core.loader import Device, Dtype, LoadOptions, files_preflight, safetensors_folder
from llmctl.core.threads import configure_cpu_threads
from llmctl.doctor.network import check_port
from llmctl.engine.builtin_setup import Attention
from llmctl.engine.vllm_setup import ExecutorBackend
from llmctl.server.admission import DEFAULT_MAX_BODY_BYTES, AdmissionLimits
from llmctl.server.engines import EngineName, engine_options
from llmctl.server.reasoning import ReasoningParserName
from llmctl.server.runner import ServeError, run_server
from llmctl.server.security import load_api_keys
from llmctl.server.store import ResponseState, default_store_url, open_store
from llmctl.server.store.state import DEFAULT_LEASE_S, DEFAULT_TTL_S
from llmctl.server.tools import ToolCallParser
from llmctl.server.transport import TransportLimits

log = logging.getLogger("llmctl.serve")

def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stdout, level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S", force=True,
    )
    for noisy in ("waitress.queue", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes' CPU backend asks for an optional package ("pip install kernels") when it is imported; its own
    # kernels serve without it, so the line only worries the operator.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """Our own log lines time each loading step; transformers' progress bars only clutter the log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def open_responses(url: str | None, ttl: float, max_mb: float) -> ResponseState | None:
    """The response store the flags name, opened (and migrated) before the port opens: a bad URL or an
    unreachable database stops the start with one clear line."""
    store = open_store(url or default_store_url())
    if store is None:
        return None
    lease = float(os.environ.get(envvars.RESPONSES_LEASE) or DEFAULT_LEASE_S)
    log.info("Stored responses: %s", store.describe())
    return ResponseState(store, ttl=ttl, max_bytes=int(max_mb * 1024 * 1024), lease_s=lease)


def port_preflight(host: str, port: int) -> None:
    """Fail before anything loads when the port cannot be listened on (IPv6 hosts: the server says)."""
    if port == 0 or ":" in host:
        return
    check = check_port(port, host or "0.0.0.0")
    if check.status != "ok":
        raise ServeError(f"Cannot listen on {host}:{port}: {check.finding}. {check.fix}")


def lora_preflight(load: LoadOptions, given: list[str], max_loras: int, max_rank: int) -> tuple[AdapterSpec, ...]:
    """The --lora adapters, each checked (files, rank, fit to the model's weights) before anything loads."""
    specs = [AdapterSpec.parse(text) for entry in given for text in entry.split() if text]
    check_adapters(specs, safetensors_folder(load), max_rank, max_loras)
    return tuple(specs)


# A flag only one engine honours is a field of that engine's options type (llmctl.server.engines) of the same
# name, shown under its engine's help panel; `engine_options` checks it and builds the options from it.
def serve(
    ctx: typer.Context,
    model_path: ModelPathOpt = None,
    config: ConfigOpt = None,
    host: Annotated[str, typer.Option(envvar=envvars.HOST, help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(
        envvar=envvars.PORT, min=0, max=65535, help="Port to listen on (0: any free port).")] = 8080,
    load_in_8bit: Annotated[bool, typer.Option(
        "--load-in-8bit", "--load_in_8bit", envvar=envvars.LOAD_IN_8BIT,
        help="Quantize the weights to 8 bits with bitsandbytes (about half the memory of fp16).")] = False,
    load_in_4bit: Annotated[bool, typer.Option(
        "--load-in-4bit", "--load_in_4bit", envvar=envvars.LOAD_IN_4BIT,
        help="Quantize the weights to 4-bit NF4 with bitsandbytes (about a quarter of the memory of fp16).")] = False,
    dtype: Annotated[Dtype, typer.Option(
        envvar=envvars.DTYPE, help="Weight dtype. auto: bf16 where the hardware supports it, else fp16 on CUDA, "
        "fp32 on CPU.")] = "auto",
    device: Annotated[Device, typer.Option(
        envvar=envvars.DEVICE, help="auto: every visible GPU (accelerate's device_map='auto'), else CPU.")] = "auto",
    served_model_name: Annotated[str | None, typer.Option(
        envvar=envvars.SERVED_MODEL_NAME, help="The model name clients use. Default: the folder or file name.")] = None,
    max_model_len: Annotated[int | None, typer.Option(
        envvar=envvars.MAX_MODEL_LEN, help="Cap the context length (prompt + completion) below the model's.")] = None,
    max_num_seqs: Annotated[int, typer.Option(
        envvar=envvars.MAX_NUM_SEQS, min=1, help="Most sequences generated together in one batch.")] = 32,
    max_batched_tokens: Annotated[int, typer.Option(
        envvar=envvars.MAX_BATCHED_TOKENS, min=16,
        help="Most prompt tokens prefilled in one step; longer prompts are prefilled in chunks.")] = 2048,
    max_prefill_tokens: Annotated[int | None, typer.Option(
        envvar=envvars.MAX_PREFILL_TOKENS, min=1,
        help="Builtin engine: most prompt tokens in one prefill pass over new requests; a step runs passes up to "
        "--max-batched-tokens, and each pass's requests get their first token when it ends. A prompt longer than "
        "this gets a pass of its own. Default: 256 on CPU (first tokens sooner for a few percent of throughput), "
        "--max-batched-tokens on GPUs.")] = None,
    prefill_wait_ms: Annotated[float | None, typer.Option(
        envvar=envvars.PREFILL_WAIT_MS, min=0, max=1000,
        help="Builtin engine: when idle, how long to wait for the rest of a burst of requests before prefilling "
        "(it starts once none arrived for this long, at most 4x this after the first), so the burst is prefilled "
        "in full passes. Default: 10 on CPU, 0 on GPUs.")] = None,
    max_waiting: Annotated[int, typer.Option(
        envvar=envvars.MAX_WAITING, min=1, help="Requests that may wait for a batch slot; beyond it: 429.")] = 64,
    kv_cache_tokens: Annotated[int, typer.Option(
        envvar=envvars.KV_CACHE_TOKENS, min=16,
        help="KV cache budget in token slots over all running sequences (bounds memory).")] = 65536,
    prefix_cache_tokens: Annotated[int, typer.Option(
        envvar=envvars.PREFIX_CACHE_TOKENS, min=0,
        help="Of the KV budget, token slots that keep computed prompt prefixes for later requests "
             "(least recently used out first; running sequences take precedence). 0: no prefix caching.")] = 8192,
    attention: Annotated[Attention, typer.Option(
        envvar=envvars.ATTENTION,
        help="The builtin engine's attention. auto: llmctl's grouped-query function on CPU (several times faster "
        "decoding on long contexts), transformers' choice on GPUs. grouped: llmctl's everywhere. transformers: "
        "transformers' choice everywhere.")] = "auto",
    speculative_config: Annotated[str | None, typer.Option(
        envvar=envvars.SPECULATIVE_CONFIG,
        help='Speculative decoding, as vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": 5, '
        '"prompt_lookup_max": 4} drafts from the request\'s own prompt and output; {"model": PATH, '
        '"num_speculative_tokens": 4} from a smaller model of the same tokenizer. The builtin engine verifies the '
        "drafts in one pass and speculates only while it pays; output is what it would be without it "
        "(docs/engine.md).")] = None,
    deterministic: Annotated[bool, typer.Option(
        "--deterministic", envvar=envvars.DETERMINISTIC,
        help="Builtin engine: a request's tokens at temperature 0 (or with a seed) do not depend on the other "
        "requests in its batch (each is computed as if it ran alone: prefills one at a time, each decode row a "
        "pass of its own, no shared prefixes or speculation), at a cost in throughput (docs/benchmarks.md). "
        "Without it they already do not depend on the prefix cache.")] = False,
    request_timeout: Annotated[float, typer.Option(
        envvar=envvars.REQUEST_TIMEOUT, min=1, max=300,
        help="Default per-request timeout in seconds (a request's 'timeout' field overrides it).")] = 60.0,
    max_tokens_cap: Annotated[int | None, typer.Option(
        envvar=envvars.MAX_TOKENS_CAP, min=1, help="Reject requests asking for more max_tokens than this.")] = None,
    default_max_tokens: Annotated[int | None, typer.Option(
        envvar=envvars.DEFAULT_MAX_TOKENS, min=1,
        help="max_tokens for requests that send none. Default: the rest of the context.")] = None,
    max_body_bytes: Annotated[int, typer.Option(
        envvar=envvars.MAX_BODY_BYTES, min=1024, help="Largest accepted request body (413 beyond).")] =
        DEFAULT_MAX_BODY_BYTES,
    max_preparing_requests: Annotated[int | None, typer.Option(
        envvar=envvars.MAX_PREPARING_REQUESTS, min=1,
        help="Requests read, parsed and tokenized at once (429 beyond). Default: max-num-seqs + max-waiting.")] = None,
    max_preparing_bytes: Annotated[int | None, typer.Option(
        envvar=envvars.MAX_PREPARING_BYTES, min=1024,
        help="Body bytes of the requests read, parsed and tokenized at once (429 beyond; tokenizing takes about "
        "100x a prompt's size at its peak). Default: 2 x max-body-bytes.")] = None,
    max_waiting_tokens: Annotated[int | None, typer.Option(
        envvar=envvars.MAX_WAITING_TOKENS, min=1,
        help="Prompt tokens that may wait for a batch slot (429 beyond; a prompt alone always may). "
        "Default: kv-cache-tokens.")] = None,
    header_timeout: Annotated[float, typer.Option(
        envvar=envvars.HEADER_TIMEOUT, min=0.1,
        help="Seconds a client has to send a request's headers (from connecting, or from the request's first "
        "byte); then 408 and the connection closes.")] = 10.0,
    body_timeout: Annotated[float, typer.Option(
        envvar=envvars.BODY_TIMEOUT, min=0.1,
        help="Seconds a client has to send a request's body after its headers; then 408.")] = 30.0,
    max_connections: Annotated[int, typer.Option(
        envvar=envvars.MAX_CONNECTIONS, min=1,
        help="Open client connections at most; beyond it a new one closes the oldest that has not sent a "
        "complete request (408), or gets 503 when all are busy with requests.")] = 1000,
    max_client_connections: Annotated[int | None, typer.Option(
        envvar=envvars.MAX_CLIENT_CONNECTIONS, min=1,
        help="Open connections from one client address at most (429 and close beyond). Default: the worker "
        "threads.")] = None,
    grace_period: Annotated[float, typer.Option(
        envvar=envvars.GRACE_PERIOD, min=0, help="Seconds in-flight requests get to finish on SIGINT/SIGTERM.")] = 30.0,
    api_key: Annotated[list[str] | None, typer.Option(
        envvar=envvars.API_KEY, show_envvar=True,
        help="Require 'Authorization: Bearer <key>' on /v1/* (repeat, or comma-separate, for several keys).")] = None,
    api_key_file: Annotated[Path | None, typer.Option(
        envvar=envvars.API_KEY_FILE, help="A file of API keys, one per line.")] = None,
    public_metrics: Annotated[bool, typer.Option(
        envvar=envvars.PUBLIC_METRICS, help="Serve /metrics without an API key (it needs one by default).")] = False,
    allowed_origins: Annotated[str, typer.Option(
        envvar=envvars.ALLOWED_ORIGINS,
        help="Comma-separated origins allowed by CORS (browser apps), e.g. https://app.example.com. "
             "Default: none.")] = "",
    max_messages: Annotated[int, typer.Option(
        envvar=envvars.MAX_MESSAGES, min=1, help="Most messages accepted in one request.")] = 1024,
    tool_call_parser: Annotated[ToolCallParser, typer.Option(
        envvar=envvars.TOOL_CALL_PARSER,
        help="How the model writes tool calls, with vLLM's names: hermes (Qwen 2/2.5/3, Hermes, SmolLM3), "
        "llama3_json (Llama 3.1/3.3), pythonic (Llama 3.2/4), mistral, qwen3_coder, openai (gpt-oss harmony); "
        "they come back as tool_calls / function_call items / tool_use blocks. auto: read it from the chat "
        "template and tokenizer (logged); none: answers stay text.",
    )] = "auto",
    enable_auto_tool_choice: Annotated[bool, typer.Option(
        "--enable-auto-tool-choice", envvar=envvars.ENABLE_AUTO_TOOL_CHOICE,
        help="Accepted for vLLM's command lines: llmctl always parses tool calls under tool_choice 'auto' "
        "when it has a parser.")] = False,
    reasoning_parser: Annotated[ReasoningParserName, typer.Option(
        envvar=envvars.REASONING_PARSER,
        help="How the model marks its thinking, with vLLM's names: deepseek_r1 (DeepSeek-R1 and distills), qwen3 "
        "(Qwen3, QwQ, SmolLM3: <think>...</think>), openai_gptoss (gpt-oss' analysis channel); the thinking comes "
        "back apart from the answer (reasoning / reasoning_content, reasoning items, thinking blocks). auto: read "
        "it from the chat template and tokenizer (logged); none: thinking stays in the answer.",
    )] = "auto",
    responses_store: Annotated[str | None, typer.Option(
        envvar=envvars.RESPONSES_STORE,
        help="Where /v1/responses keeps responses and conversations: sqlite:///PATH (relative; sqlite:////PATH "
        "absolute), postgresql://USER:PASSWORD@HOST/DB (replicas sharing it see each other's responses; needs "
        "llmctl[postgres]), or none (stateless: store, previous_response_id, background and conversations are "
        "refused). Default: responses.db in the user data folder.")] = None,
    responses_ttl: Annotated[float, typer.Option(
        envvar=envvars.RESPONSES_TTL, min=60,
        help="Seconds a stored response (or a conversation, since its last use) is kept; the server deletes "
        "expired ones.")] = DEFAULT_TTL_S,
    responses_max_mb: Annotated[float, typer.Option(
        envvar=envvars.RESPONSES_MAX_MB, min=1,
        help="Size bound of the stored responses (their JSON, in MB): beyond it the oldest are deleted.")] = 1024,
    cpu_threads: Annotated[int | None, typer.Option(
        envvar=envvars.CPU_THREADS, min=1,
        help="Torch's compute threads, fixed. Default: adaptive: the builtin engine starts with every core this "
        "process may use (its CPU affinity and cgroup quota) and keeps whichever count (all of them, or fewer "
        "down to 1) makes its decode steps faster, so it holds up on an idle machine and on one that other work "
        "also uses.")] = None,
    http_threads: Annotated[int | None, typer.Option(
        envvar=envvars.HTTP_THREADS, min=4,
        help="HTTP server threads (each streaming request holds one). Default: max-num-seqs + max-waiting + "
        "16.")] = None,
    threads: Annotated[int | None, typer.Option(
        envvar=envvars.THREADS, min=4, hidden=True, help="Deprecated name of --http-threads.")] = None,
    engine_kind: Annotated[EngineName, typer.Option(
        "--engine", envvar=envvars.ENGINE,
        help="builtin: llmctl's own engine (starts in seconds). vllm: vLLM's engine in this process (make install "
        "ENGINE=vllm): faster batching, several GPUs or machines; on a CPU its start takes minutes.")] = "builtin",
    tensor_parallel_size: Annotated[int, typer.Option(
        envvar=envvars.TENSOR_PARALLEL_SIZE, min=1, rich_help_panel="--engine vllm",
        help="Split every layer over this many GPUs (one machine).")] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option(
        envvar=envvars.PIPELINE_PARALLEL_SIZE, min=1, rich_help_panel="--engine vllm",
        help="Split the layers into this many stages (GPUs or machines, see docs/scaling.md).")] = 1,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        envvar=envvars.GPU_MEMORY_UTILIZATION, min=0.01, max=1.0, rich_help_panel="--engine vllm",
        help="Share of each GPU's memory vLLM may use for weights, activations and KV cache. Default: 0.9.")] = None,
    distributed_executor_backend: Annotated[ExecutorBackend, typer.Option(
        envvar=envvars.DISTRIBUTED_EXECUTOR_BACKEND, rich_help_panel="--engine vllm",
        help="How vLLM runs its workers: mp (processes on this machine) or ray (a Ray cluster). auto: vLLM's "
        "choice.")] = "auto",
    enable_prefix_caching: Annotated[bool, typer.Option(
        envvar=envvars.ENABLE_PREFIX_CACHING, rich_help_panel="--engine vllm",
        help="Reuse the KV cache of prompt prefixes seen before (shared system prompts, conversations).")] = True,
    enforce_eager: Annotated[bool, typer.Option(
        envvar=envvars.ENFORCE_EAGER, rich_help_panel="--engine vllm",
        help="Skip vLLM's torch.compile: starts in seconds instead of minutes, generates slower.")] = False,
    lora: Annotated[list[str] | None, typer.Option(
        "--lora", "--lora-modules", envvar=envvars.LORA, rich_help_panel="LoRA adapters",
        help="Serve a PEFT LoRA adapter folder for this model as model NAME: NAME=PATH (repeat for several; "
        "--lora-modules is vLLM's name). Requests with model NAME run with it, beside the base model's.")] = None,
    enable_lora: Annotated[bool, typer.Option(
        "--enable-lora", envvar=envvars.ENABLE_LORA, rich_help_panel="LoRA adapters",
        help="Serve LoRA adapters loaded at run time (POST /v1/load_lora_adapter) even when no --lora is "
        "given.")] = False,
    max_loras: Annotated[int, typer.Option(
        envvar=envvars.MAX_LORAS, min=1, rich_help_panel="LoRA adapters",
        help="Most LoRA adapters loaded at once.")] = DEFAULT_MAX_LORAS,
    max_lora_rank: Annotated[int, typer.Option(
        envvar=envvars.MAX_LORA_RANK, min=1, rich_help_panel="LoRA adapters",
        help="Highest LoRA rank accepted.")] = DEFAULT_MAX_LORA_RANK,
    log_level: Annotated[str, typer.Option(envvar=envvars.LOG_LEVEL, help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve a chat model with an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health, /metrics)."""
    setup_logging(log_level)
    if threads is not None:
        log.warning("--threads (LLMCTL_THREADS) is deprecated: it sets the HTTP server threads; use --http-threads "
                    "(LLMCTL_HTTP_THREADS). Torch's compute threads are --cpu-threads.")
        http_threads = http_threads or threads
    model_path = configured_model_path(config, model_path)
    options = engine_options(engine_kind, ctx.params)  # another engine's flags: refused before anything loads
    speculative = options.speculative(speculative_config) if speculative_config else None
    load = LoadOptions(
        model_path=model_path, dtype=dtype, device=device,
        quantization=LoadOptions.quantization_from_flags(load_in_8bit, load_in_4bit),
        max_model_len=max_model_len, served_model_name=served_model_name,
    )
    files_preflight(load)
    adapters = lora_preflight(load, lora or [], max_loras, max_lora_rank)
    port_preflight(host, port)
    keys = load_api_keys(api_key or [], api_key_file)
    compute = configure_cpu_threads(cpu_threads)
    if note := options.compute_note(compute):
        log.info("Compute: %s", note)
    quiet_libraries()
    from llmctl.engine import EngineConfig
    from llmctl.server.app import HTTPOptions, create_app
    from llmctl.server.service import Service, ServiceSettings

    options.preflight(load)
    engine = EngineConfig(max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens,
                          max_waiting=max_waiting, kv_cache_tokens=kv_cache_tokens,
                          prefix_cache_tokens=prefix_cache_tokens,
                          speculative=speculative)
    responses = open_responses(responses_store, responses_ttl, responses_max_mb)
    service = Service(ServiceSettings(load=load, engine=engine, engine_options=options,
                                      request_timeout=request_timeout,
                                      max_tokens_cap=max_tokens_cap, default_max_tokens=default_max_tokens,
                                      max_messages=max_messages, tool_call_parser=tool_call_parser,
                                      reasoning_parser=reasoning_parser,
                                      loras=adapters, enable_lora=enable_lora, max_loras=max_loras,
                                      max_lora_rank=max_lora_rank,
                                      admission=AdmissionLimits(max_preparing_requests, max_preparing_bytes,
                                                                max_waiting_tokens).derive(
                                          max_num_seqs=max_num_seqs, max_waiting=max_waiting,
                                          kv_cache_tokens=kv_cache_tokens, max_body_bytes=max_body_bytes)),
                      responses=responses)
    origins = tuple(o.strip() for o in allowed_origins.split(",") if o.strip())
    app = create_app(service, HTTPOptions(max_body_bytes=max_body_bytes, api_keys=keys,
                                          public_metrics=public_metrics, allowed_origins=origins))

    def warn_if_open() -> None:
        if not keys and host in ("0.0.0.0", "::", ""):
            log.warning("Listening on all interfaces (%s) without an API key: anyone who can reach this port can use "
                        "the model. Pass --api-key, or --host 127.0.0.1 for local use only.", host or "*")

    # Every generating request holds a thread; /health has threads of its own (server/transport.py).
    http_threads = http_threads or max_num_seqs + max_waiting + 16
    limits = TransportLimits(header_timeout=header_timeout, body_timeout=body_timeout,
                             max_connections=max_connections,
                             max_client_connections=max_client_connections or http_threads)
    code = run_server(app, service, host, port, threads=http_threads, grace_period=grace_period, limits=limits,
                      on_listening=warn_if_open)
    raise typer.Exit(code)
