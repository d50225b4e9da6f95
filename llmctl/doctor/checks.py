"""`llmctl doctor`: check the machine, the model and the service, and say what to fix before a load fails."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmctl import envvars
from llmctl.core import hardware
from llmctl.core.adapters import DEFAULT_MAX_LORA_RANK, AdapterError, AdapterSpec, check_adapters
from llmctl.core.threads import ThreadPolicy, usable_cores
from llmctl.doctor.fit import (
    SERVE_KV_CACHE_TOKENS,
    FitPrediction,
    attention_from_config,
    context_length_of,
    fmt_bytes,
    predict_fit,
)
from llmctl.doctor.machine import Machine, probe_machine
from llmctl.doctor.modelcheck import Check, ModelInfo, Status, check_model
from llmctl.doctor.network import check_port, check_service
from llmctl.doctor.vllmcheck import VllmPlan, vllm_checks

__all__ = ["Check", "DoctorOptions", "Machine", "Report", "run_doctor", "predict_fit"]

PACKAGES = ("torch", "transformers", "accelerate", "flask", "safetensors", "gguf")
OPTIONAL_PACKAGES = ("bitsandbytes",)
LOW_DISK_BYTES = 2 * 1024**3
CPU_TIP = ("For faster responses use a CUDA GPU; on CPU, keep to small models (up to 1-3B parameters) and "
           "short max_tokens.")
TORCH_CUDA_INSTALL = ("pip install torch --index-url https://download.pytorch.org/whl/cu126 "
                      "(pick the CUDA version your driver supports at https://pytorch.org/get-started)")


@dataclass(frozen=True)
class DoctorOptions:
    model_path: Path | None = None
    context_length: int | None = None
    batch_size: int = 1
    port: int = 8080
    url: str | None = None
    kv_cache_tokens: int = SERVE_KV_CACHE_TOKENS
    vllm: VllmPlan | None = None  # serve --engine vllm: its checks too
    loras: tuple[str, ...] = ()  # serve's --lora adapters (NAME=PATH or PATH): checked against the model


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _minimum_versions() -> dict[str, str]:
    """Lower bounds from llmctl's own package metadata, so they are declared once (pyproject.toml)."""
    try:
        requires = importlib.metadata.requires("llmctl") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    found = {}
    for req in requires:
        spec = req.split(";")[0].strip()
        if ">=" in spec:
            name, low = spec.split(">=", 1)
            found[name.strip().lower()] = low.split(",")[0].strip()
    return found


def check_packages(machine: Machine) -> Check:
    """Python and the versions of the packages loading depends on."""
    minimums = _minimum_versions()
    versions: dict[str, str | None] = {}
    for name in PACKAGES + OPTIONAL_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    too_old = [n for n in PACKAGES if n in minimums and (found := versions[n])
               and _version_tuple(found) < _version_tuple(minimums[n])]
    problems = [f"{n} is not installed" for n in PACKAGES if versions[n] is None]
    problems += [f"{n} {versions[n]} is older than the required {minimums[n]}" for n in too_old]
    build = f"CUDA {machine.cuda_build} build" if machine.cuda_build else "CPU-only build"
    shown = [f"{n} {v}" + (f" ({build})" if n == "torch" else "") for n, v in versions.items() if v]
    finding = f"Python {platform.python_version()}; " + ", ".join(shown)
    details = {"python": platform.python_version(), "executable": sys.executable, **versions,
               "torch_build": machine.cuda_build}
    if problems:
        needed = " ".join(f"'{n}>={minimums[n]}'" if n in minimums else n
                          for n in PACKAGES if versions[n] is None or n in too_old)
        return Check("Python & packages", "failure", "; ".join(problems) + f" ({finding})",
                     f"pip install -U {needed}", details)
    return Check("Python & packages", "ok", finding, details=details)


def check_cuda(machine: Machine) -> Check:
    """The GPUs PyTorch can use, or a plain statement that llmctl runs on the CPU, and why."""
    m = machine
    if m.gpus:
        gpus = [{"index": g.index, "name": g.name, "total_bytes": g.total_bytes, "free_bytes": g.free_bytes,
                 "compute_capability": "{}.{}".format(*g.capability), "bf16": g.bf16} for g in m.gpus]
        shown = "; ".join(
            f"GPU {g.index} {g.name}: {fmt_bytes(g.total_bytes)}, {fmt_bytes(g.free_bytes)} free, "
            f"compute {g.capability[0]}.{g.capability[1]}, bf16 {'yes' if g.bf16 else 'no'}" for g in m.gpus)
        finding = (f"{len(m.gpus)} CUDA GPU(s), driver {m.driver or 'unknown'}, torch CUDA {m.cuda_build}: "
                   f"{shown}")
        details = {"device_count": len(m.gpus), "driver": m.driver, "gpus": gpus}
        busy = [g for g in m.gpus if g.free_bytes < 0.1 * g.total_bytes]
        if busy:
            g = busy[0]
            return Check("CUDA", "warning", f"GPU {g.index} has only {fmt_bytes(g.free_bytes)} of "
                         f"{fmt_bytes(g.total_bytes)} free: another process holds it. {finding}",
                         "See which process with nvidia-smi and stop it, or pick a free GPU with "
                         "CUDA_VISIBLE_DEVICES=<index>.", details)
        emulated = [g for g in m.gpus if not g.bf16]
        if m.default_precision == "bf16" and emulated:
            g = emulated[0]
            return Check("CUDA", "warning", f"serve picks bf16 from GPU {m.gpus[0].index}, but GPU {g.index} "
                         f"({g.name}) has no native bf16: the layers placed there run emulated, slowly. "
                         f"{finding}", "llmctl serve --dtype float16, or use only the bf16 GPUs "
                         "(CUDA_VISIBLE_DEVICES).", details)
        return Check("CUDA", "ok", finding, details=details)

    flags = m.cpu_flags
    cpu = (f"{m.cpu_cores} CPU cores, {fmt_bytes(m.ram_total)} RAM ({fmt_bytes(m.ram_available)} available); "
           f"AVX2 {'yes' if 'avx2' in flags else 'no'}, AVX-512 {'yes' if 'avx512f' in flags else 'no'}, "
           f"native bf16 {'yes' if m.cpu_bf16 else 'no'} (so {m.default_precision} weights by default)")
    details = {"device_count": 0, "driver": m.driver, "cpu_cores": m.cpu_cores,
               "ram_total_bytes": m.ram_total, "ram_available_bytes": m.ram_available,
               "avx2": "avx2" in flags, "avx512": "avx512f" in flags, "cpu_bf16": m.cpu_bf16}
    if m.driver and m.cuda_hidden:
        return Check("CUDA", "warning", f"CUDA_VISIBLE_DEVICES hides every GPU, so llmctl runs on the CPU: "
                     f"{cpu}", "Unset CUDA_VISIBLE_DEVICES (or list the GPUs to use).", details)
    if m.driver and m.cuda_build is None:
        return Check("CUDA", "warning", f"This machine has an NVIDIA driver ({m.driver}) but torch is a "
                     f"CPU-only build, so llmctl runs on the CPU: {cpu}", TORCH_CUDA_INSTALL, details)
    if m.driver:
        return Check("CUDA", "failure", f"torch (CUDA {m.cuda_build} build) cannot use the NVIDIA driver "
                     f"{m.driver}: {m.cuda_error or 'no usable device'}",
                     f"Run nvidia-smi; update the driver to one that supports CUDA {m.cuda_build}, or "
                     f"install a torch build for the CUDA version the driver supports: {TORCH_CUDA_INSTALL}",
                     details)
    if "avx2" not in flags:
        return Check("CUDA", "warning", f"No CUDA GPU, and the CPU lacks AVX2, so generation will be slow: "
                     f"{cpu}", CPU_TIP, details)
    return Check("CUDA", "ok", f"No CUDA GPU: llmctl runs on the CPU. {cpu}", CPU_TIP, details)


def check_bitsandbytes(status: hardware.BitsAndBytesStatus, machine: Machine) -> Check:
    """Which of --load-in-8bit / --load-in-4bit will work here."""
    details = {"installed": status.installed, "version": status.version, "importable": status.importable,
               "int8": status.int8, "nf4": status.nf4}
    if not status.installed:
        return Check("bitsandbytes", "warning", "Not installed: --load-in-8bit and --load-in-4bit are "
                     "unavailable", hardware.INSTALL_BNB, details)
    modes = f"8-bit {'yes' if status.int8 else 'no'}, 4-bit {'yes' if status.nf4 else 'no'}"
    if not (status.int8 and status.nf4):
        return Check("bitsandbytes", "warning", f"bitsandbytes {status.version}: {modes}",
                     status.problem or "", details)
    where = "on CUDA" if machine.gpus else "on CPU (saves memory; slower than bf16)"
    return Check("bitsandbytes", "ok", f"bitsandbytes {status.version}: {modes} {where}", details=details)


def check_fit(info: ModelInfo | None, machine: Machine, bnb: hardware.BitsAndBytesStatus,
              context_length: int | None, batch_size: int,
              kv_cache_tokens: int = SERVE_KV_CACHE_TOKENS) -> tuple[Check, FitPrediction | None]:
    """Whether the model fits in free VRAM (or RAM on CPU), and which flag makes it fit."""
    if info is None or info.inventory is None:
        return Check("Fit", "warning", "Cannot predict the memory needed: no readable weights or config.json",
                     "Fix the model checks above first."), None
    config = info.config or {}
    model_context = context_length_of(config)
    context = context_length or model_context or 2048
    problems: dict[str, str | None] = {"8bit": None if bnb.int8 else "bitsandbytes cannot do 8-bit here",
                                       "4bit": None if bnb.nf4 else "bitsandbytes cannot do 4-bit here"}
    if info.is_gguf and not info.embedded_unconverted:  # the embedded GGUF is served as a converted folder
        problems = {"8bit": "not for GGUF files", "4bit": "not for GGUF files"}
    attention = attention_from_config(config)
    fit = predict_fit(info.inventory, attention, context_length=context, batch_size=batch_size,
                      available_bytes=machine.available_bytes, device=machine.device,
                      default=machine.default_precision, quantization_problem=problems,
                      kv_cache_tokens=kv_cache_tokens, devices=len(machine.gpus) or 1)
    have = f"{fmt_bytes(fit.available_bytes)} {'free GPU memory' if machine.gpus else 'available RAM'}"
    default = next(r for r in fit.rows if r.default)
    details = {**fit.to_dict(), "parameters": info.inventory.total, "parameters_from": info.inventory.source,
               "model_context_length": model_context,
               "kv_cache_bytes_per_token_16bit": attention.kv_bytes_per_token(2) if attention else None}
    counted = f"{_count(info.inventory.total)} parameters ({_source_words(info.inventory.source)})"
    kv_note = "" if attention else "; KV cache unknown (config.json states no layers/heads)"
    needs = fmt_bytes(default.total_bytes)
    kv = f"{fit.kv_tokens:,} KV-cache tokens"
    if fit.choice is default:
        return Check("Fit", "ok", f"Fits in {default.label} (the default): needs {needs} with {kv}, {have}; "
                     f"{counted}{kv_note}", details=details), fit
    smaller = fit.smaller_kv()
    if smaller is not None and smaller[0] is default:
        # Serve grows its cache only as far as the traffic needs, so shrinking its budget keeps the
        # default precision; quantizing is the second way out, not the first.
        n = smaller[1]
        details["smaller_kv_cache"] = {"precision": default.precision, "kv_cache_tokens": n}
        fix = _shrink_kv_fix("", n, fit)
        if fit.choice is not None:
            fix += f"; or keep {kv} with llmctl serve {fit.choice.flag} ({fmt_bytes(fit.choice.total_bytes)})"
        return Check("Fit", "warning", f"{default.label} (the default) fits only with a smaller KV cache: "
                     f"the weights fit, but with {kv} it needs {needs}, {have}; up to {n:,} tokens fit. "
                     f"{counted}", fix, details), fit
    if fit.choice is not None:
        c = fit.choice
        return Check("Fit", "warning", f"Needs {c.flag}: {default.label} needs {needs}, {have}; {c.label} "
                     f"needs {fmt_bytes(c.total_bytes)} with {kv}. {counted}{kv_note}",
                     f"llmctl serve {c.flag}", details), fit
    if smaller is not None:
        row, n = smaller
        details["smaller_kv_cache"] = {"precision": row.precision, "kv_cache_tokens": n}
        return Check("Fit", "warning", f"Needs {row.flag} and a smaller KV cache: {row.label} needs "
                     f"{fmt_bytes(row.total_bytes)} with {kv}, {have}; its weights fit with up to {n:,} "
                     f"tokens. {counted}", _shrink_kv_fix(row.flag, n, fit), details), fit
    smallest = min(fit.rows, key=lambda r: r.total_bytes)
    blocked = [r for r in fit.rows if not r.usable and fit.fits(r)]
    if blocked:
        r = blocked[0]
        if info.is_gguf:
            fix = "Use the model's Hugging Face folder (8/4-bit loading works on folders, not GGUF files)."
        else:
            fix = bnb.problem or hardware.INSTALL_BNB
        return Check("Fit", "failure", f"Does not fit unquantized ({default.label} needs {needs}, {have}); "
                     f"{r.label} would fit but {r.note}. {counted}", fix, details), fit
    fix = "Use a smaller model or a machine with more memory"
    if smallest.kv_bytes > smallest.weights_bytes:
        fix += (f"; the KV cache ({fmt_bytes(smallest.kv_bytes)} for {kv}) dominates: lower "
                "--context-length/--batch-size/--kv-cache-tokens here and --kv-cache-tokens, --max-model-len "
                "or --max-num-seqs for llmctl serve")
    return Check("Fit", "failure", f"Does not fit: needs {fmt_bytes(smallest.total_bytes)} even in "
                 f"{smallest.label}, {have}. {counted}", fix + ".", details), fit


def _shrink_kv_fix(flag: str, tokens: int, fit: FitPrediction) -> str:
    """The serve flags that bound its KV cache to ``tokens`` slots."""
    serve = f"llmctl serve {flag + ' ' if flag else ''}--kv-cache-tokens {tokens}"
    if tokens < fit.context_length:  # one request may not reserve more than the whole budget
        serve += f" --max-model-len {tokens}"
    return (f"{serve} (or lower --max-model-len and --max-num-seqs so that their product is at most "
            f"{tokens:,})")


def _source_words(source: str) -> str:
    return {"safetensors": "read from the safetensors headers", "gguf": "read from the GGUF tensor table",
            "config": "estimated from config.json"}[source]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e7 else f"{n:,}"


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(info: ModelInfo | None, cache: Path) -> Check:
    """Free space where the model and llmctl's cache live (the embedded model is converted into the cache)."""
    places = {"model": info.source.folder, "cache": cache} if info is not None else {"cache": cache}
    need = 2 * info.inventory.total if info and info.embedded_unconverted and info.inventory else 0
    parts, details, status = [], {}, "ok"
    seen: dict[int, str] = {}
    for what, where in places.items():
        usage = shutil.disk_usage(_existing(where))
        device = _existing(where).stat().st_dev
        details[what] = {"path": str(where), "free_bytes": usage.free, "total_bytes": usage.total}
        if device in seen:
            parts.append(f"{what} {where}: same disk as the {seen[device]}")
        else:
            seen[device] = what
            parts.append(f"{what} {where}: {fmt_bytes(usage.free)} free of {fmt_bytes(usage.total)}")
        if what == "cache" and usage.free < need:
            status = "failure"
        elif usage.free < LOW_DISK_BYTES and status == "ok":
            status = "warning"
    finding = "; ".join(parts)
    if status == "failure":
        return Check("Disk", "failure", f"The embedded model needs {fmt_bytes(need)} in the cache to be "
                     f"converted: {finding}",
                     "Free space there, or point LLMCTL_CACHE_DIR at a disk with room.", details)
    if status == "warning":
        return Check("Disk", "warning", f"Less than {fmt_bytes(LOW_DISK_BYTES)} free: {finding}",
                     "Free some space (downloads, conversions and logs need room).", details)
    return Check("Disk", "ok", finding, details=details)


def check_cpu_load(requested: str | None = None, load: float | None = None) -> Check:
    """The compute threads `llmctl serve` would use here, and whether other work already fills the cores."""
    cores = usable_cores()
    fixed = int(requested) if requested and requested.isdigit() and int(requested) > 0 else None
    plan = ThreadPolicy(cores=cores, fixed=fixed, current=fixed or cores, tuned=fixed is None and cores > 1)
    load = os.getloadavg()[0] if load is None else load
    details = {"usable_cores": cores, "cpu_threads": plan.current, "cpu_threads_policy": plan.mode,
               "load_average_1m": round(load, 2)}
    finding = f"llmctl serve would use {plan.describe()}; load average {load:.1f}"
    if load > cores:
        if fixed is None:
            advice = "keep the adaptive default: it drops to fewer threads while the cores are busy"
        elif fixed > 1:
            advice = (f"unset LLMCTL_CPU_THREADS (the adaptive default follows the load) or lower it: {fixed} "
                      "threads on busy cores decode several times slower than 1")
        else:
            advice = "1 thread, as set, is what suffers least on busy cores"
        return Check("CPU load", "warning", f"{finding}: other work keeps more than the {cores} core(s) busy, so "
                     "generation will be slow and uneven",
                     f"Stop or pause the other work, or serve on a machine with idle cores; {advice}.", details)
    return Check("CPU load", "ok", finding, details=details)


@dataclass
class Report:
    checks: list[Check]
    fit: FitPrediction | None = None
    model: str | None = None

    @property
    def exit_code(self) -> int:
        """0 when no check failed (warnings do not count), 1 otherwise."""
        return 1 if any(c.status == "failure" for c in self.checks) else 0

    def count(self, status: Status) -> int:
        return sum(c.status == status for c in self.checks)

    def to_dict(self) -> dict:
        return {"model": self.model, "checks": [c.to_dict() for c in self.checks],
                "fit": self.fit.to_dict() if self.fit else None,
                "summary": {s: self.count(s) for s in ("ok", "warning", "failure")},
                "exit_code": self.exit_code}


def run_doctor(options: DoctorOptions) -> Report:
    """Run every check; none loads weights, so the whole report takes seconds."""
    from llmctl.core.embedded import cache_dir

    machine = probe_machine()
    bnb = hardware.probe_bitsandbytes()
    checks = [_guarded("Python & packages", check_packages, machine), _guarded("CUDA", check_cuda, machine),
              _guarded("bitsandbytes", check_bitsandbytes, bnb, machine)]
    try:
        model_checks, info = check_model(options.model_path)
    except Exception as exc:  # an unreadable folder (permissions, a broken mount), or a file no check foresaw
        model_checks, info = [_could_not_check("Model files", exc)], None
    checks += model_checks
    try:
        fit_check, fit = check_fit(info, machine, bnb, options.context_length, options.batch_size,
                                   options.kv_cache_tokens)
    except Exception as exc:
        fit_check, fit = _could_not_check("Fit", exc), None
    checks += [_guarded(f"LoRA {text}", check_lora, text, info) for text in options.loras]
    checks += [fit_check, _guarded("Disk", check_disk, info, cache_dir()),
               _guarded("CPU load", check_cpu_load, os.environ.get(envvars.CPU_THREADS))]
    if options.vllm is not None:
        try:
            checks += vllm_checks(machine, fit, options.vllm)
        except Exception as exc:
            checks.append(_could_not_check("vLLM", exc))
    if options.url:
        checks.append(_guarded("Service", check_service, options.url))
    else:
        checks.append(_guarded("Port", check_port, options.port))
    return Report(checks, fit, info.label if info else None)


def check_lora(text: str, info: ModelInfo | None) -> Check:
    """One --lora adapter, as serve's preflight checks it: its files, config and rank, and every adapted layer
    against the model's weights (when the model is a safetensors folder)."""
    try:
        spec = AdapterSpec.parse(text)
        (adapter,) = check_adapters([spec], info.source.folder if info and not info.is_gguf else None,
                                    DEFAULT_MAX_LORA_RANK, 1)
    except AdapterError as exc:
        return Check(f"LoRA {text}", "failure", exc.message,
                     "Serve it with a model it was trained for, or make it again with PEFT (save_pretrained).")
    checked = "checked against the model's weights" if info and not info.is_gguf else \
        "not checked against a GGUF model's layers (the server checks them when it loads the adapter)"
    return Check(f"LoRA {adapter.name}", "ok", f"rank {adapter.rank}, {len(adapter.modules)} layers, "
                 f"{fmt_bytes(adapter.weights_bytes)}; {checked}",
                 details={"name": adapter.name, "path": str(adapter.path), "rank": adapter.rank,
                          "layers": len(adapter.modules), "bytes": adapter.weights_bytes})


def _guarded(name: str, check: Callable[..., Check], *args: object) -> Check:
    """Run one check; an error it did not foresee becomes its finding instead of a traceback."""
    try:
        return check(*args)
    except Exception as exc:
        return _could_not_check(name, exc)


def _could_not_check(name: str, exc: Exception) -> Check:
    """A check that raised: a failure that says what went wrong, so the other checks still report."""
    if os.environ.get(envvars.DEBUG):
        raise exc
    if isinstance(exc, OSError):
        return Check(name, "failure", f"Could not check: {exc}", "Check the path and its permissions.")
    return Check(name, "failure", f"Could not check: {type(exc).__name__}: {exc}",
                 f"Unexpected: run again with {envvars.DEBUG}=1 for the traceback, and report it.")
