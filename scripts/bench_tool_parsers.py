"""What parsing tool calls costs: each parser on realistic streamed deltas, and a server at 16 streams, on vs off.

    python scripts/bench_tool_parsers.py [--streams 16] [--max-tokens 128] [--rounds 3] [--tiny] [--json out.json]

1. In process, for every parser: an answer in its family's format (a sentence of text, then two
   calls) is tokenized with the served model's tokenizer and detokenized token by token, as the
   server streams it; the deltas go through the parser (`feed` each, then `finish`), many times.
   Reported: microseconds of parsing per token, next to the same deltas only joined (no parser).
2. `llmctl serve --tool-call-parser hermes` (the embedded SmolLM2 unless --model-path or --tiny) in its own
   process on 127.0.0.1, round after round: --streams concurrent streamed chat requests without
   tools (no parser runs), then the same with `tools` (every delta goes through the parser). Every
   request makes exactly --max-tokens tokens (ignore_eos). Reported: tokens/s of each, and the ratio
   per round (median), target >= 0.98; and part 1's cost per token times the measured tokens/s,
   the share of one core that parsing takes at that throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_structured import PROMPTS, start_server

from llmctl.engine.text import IncrementalDetokenizer
from llmctl.server.tools import PARSERS

TEXT = "Let me look that up for you: I will check the weather in Paris and the local time there. "
ANSWERS = {
    "hermes": TEXT + '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
                     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n'
                     "</tool_call>",
    "llama3_json": TEXT + '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                          '{"name": "get_time", "parameters": {"zone": "Europe/Paris"}}',
    "pythonic": TEXT + '<|python_start|>[get_weather(city="Paris", unit="celsius"), get_time(zone="Europe/Paris")]'
                       "<|python_end|>",
    "mistral": TEXT + '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                      '{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}]',
    "qwen3_coder": TEXT + "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                          "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
                          "<function=get_time>\n<parameter=zone>\nEurope/Paris\n</parameter>\n</function>\n"
                          "</tool_call>",
    "openai": "<|channel|>analysis<|message|>" + TEXT + "<|end|><|start|>assistant<|channel|>commentary "
              'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "unit": "celsius"}<|call|>'
              "<|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>"
              '{"zone": "Europe/Paris"}<|call|>',
}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}
         for name, props in (("get_weather", {"city": {"type": "string"}, "unit": {"type": "string"}}),
                             ("get_time", {"zone": {"type": "string"}}))]


def deltas(tokenizer, text: str) -> list[str]:
    """The text as the server streams it: one detokenized piece per token."""
    detok = IncrementalDetokenizer(tokenizer, frozenset())
    return [detok.add(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def parser_costs(tokenizer, repeat: int) -> dict:
    """Microseconds per token of each parser, and of the same deltas joined without one."""
    out = {}
    for name, text in ANSWERS.items():
        pieces = deltas(tokenizer, text)
        started = time.perf_counter()
        for _ in range(repeat):
            parser = PARSERS[name](TOOLS)
            shown = "".join(parser.feed(p) for p in pieces)
            _, calls = parser.finish()
        parsed = time.perf_counter() - started
        assert len(calls) == 2 and "get_weather" not in shown, (name, shown, calls)
        started = time.perf_counter()
        for _ in range(repeat):
            "".join(p for p in pieces)
        joined = time.perf_counter() - started
        per = 1e6 / (repeat * len(pieces))
        out[name] = {"tokens": len(pieces), "calls": len(calls), "parser_us_per_token": round(parsed * per, 2),
                     "no_parser_us_per_token": round(joined * per, 3)}
    return out


def stream(client: httpx.Client, prompt: str, max_tokens: int, tools: bool) -> int:
    body: dict = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
                  "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "timeout": 300}
    if tools:
        body["tools"] = TOOLS
    tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens


def level(client: httpx.Client, args: argparse.Namespace, tools: bool) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.streams)]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.streams) as pool:
        tokens = sum(pool.map(lambda p: stream(client, p, args.max_tokens, tools), prompts))
    wall = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(wall, 2), "tokens_per_second": round(tokens / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true",
                        help="serve a tiny random model (llmctl.server.testing): far more tokens/s than a real model, "
                             "so parsing's share is an upper bound")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from llmctl.core.embedded import ensure_embedded_model

    if args.tiny:
        import tempfile

        from llmctl.server.testing import build_tiny_model

        args.model_path = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny-llama", context=1024)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path or ensure_embedded_model())
    costs = parser_costs(tokenizer, args.repeat)
    for name, row in costs.items():
        print(f"{name:12s} {row['tokens']:4d} tokens, {row['calls']} calls: {row['parser_us_per_token']:6.2f} us/token "
              f"parsed, {row['no_parser_us_per_token']:.3f} us/token joined only")
    proc, url = start_server(args, ["--tool-call-parser", "hermes"])
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            level(client, args, False)  # warm-up at full concurrency
            rounds = []
            for _ in range(args.rounds):
                off = level(client, args, False)
                on = level(client, args, True)
                rounds.append({"no_tools": off, "tools_parsed": on,
                               "ratio": round(on["tokens_per_second"] / off["tokens_per_second"], 3)})
                print(f"no parser {off['tokens_per_second']:7.1f} tok/s   hermes parser {on['tokens_per_second']:7.1f} "
                      f"tok/s   ratio {rounds[-1]['ratio']:.3f}")
    finally:
        proc.terminate()
        proc.wait(30)
    median = statistics.median(r["ratio"] for r in rounds)
    throughput = statistics.median(r["tools_parsed"]["tokens_per_second"] for r in rounds)
    worst = max(row["parser_us_per_token"] for row in costs.values())
    share = worst * 1e-6 * throughput
    print(f"median ratio (parsed / not parsed) at {args.streams} streams: {median:.3f}")
    print(f"slowest parser ({worst:.2f} us/token) at {throughput:.0f} tok/s: {share:.2%} of one core")
    if args.json:
        args.json.write_text(json.dumps({"parsers": costs, "rounds": rounds, "median_ratio": median,
                                         "parsing_share_of_one_core": share}, indent=2))


if __name__ == "__main__":
    main()
