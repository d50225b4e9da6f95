"""Torch's compute threads: how many this process should use, and setting them up before torch loads.

torch's default is one OpenMP thread per core of the host, each spinning while it waits for the
others. On a machine that other processes also use, every parallel region then waits for a thread
the kernel has descheduled, and the spinning takes the cores those processes need: decoding slows
by 10x or more. llmctl counts only the cores this process may run on (its CPU affinity and its
cgroup's CPU quota), keeps one of them for the HTTP threads, the tokenizer and the rest of the
machine, and makes idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) instead of spinning.
docs/benchmarks.md has the measurements (scripts/bench_contention.py).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

WAIT_POLICY = "OMP_WAIT_POLICY"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 cpu.max or v1 cfs quota), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((root / folder / "cpu.cfs_quota_us").read_text())
            period_us = int((root / folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def usable_cores(root: Path = CGROUP_ROOT) -> int:
    """The cores this process may run on: its affinity, capped by its cgroup's quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


def default_cpu_threads(cores: int) -> int:
    """llmctl's default: every usable core but one (the HTTP threads, the tokenizer, the neighbours)."""
    return max(1, cores - 1)


def resolve_cpu_threads(requested: int | None, root: Path = CGROUP_ROOT) -> int:
    """The compute-thread count: ``requested`` (--cpu-threads) or the default for this process's cores."""
    return requested if requested else default_cpu_threads(usable_cores(root))


def configure_cpu_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads in torch, with sleeping (not spinning) idle OpenMP threads.

    OpenMP reads its wait policy once, when torch's library loads, so this must run before torch is
    imported for the policy to apply; a policy the user set in the environment is kept.
    """
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
    if "torch" in sys.modules:
        log.debug("torch was imported before the thread setup: %s applies only to later processes", WAIT_POLICY)
    import torch

    torch.set_num_threads(threads)


def current_cpu_threads() -> int:
    """The intra-op threads torch uses now (what /health, /metrics and the start-up log report)."""
    import torch

    return torch.get_num_threads()
