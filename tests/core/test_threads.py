"""Compute threads: the cores a process may use (affinity, cgroup quota) and llmctl's default from them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmctl.core.threads import cgroup_cpu_limit, default_cpu_threads, resolve_cpu_threads, usable_cores


def write(root: Path, name: str, text: str) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)


@pytest.mark.parametrize(("files", "limit"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_quota_in_cores(tmp_path, files, limit):
    for name, text in files.items():
        write(tmp_path, name, text)
    assert cgroup_cpu_limit(tmp_path) == limit


def test_usable_cores_is_affinity_capped_by_the_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == affinity
    write(tmp_path, "cpu.max", "50000 100000")  # half a core still runs one thread
    assert usable_cores(tmp_path) == 1
    write(tmp_path, "cpu.max", f"{(affinity + 4) * 100000} 100000")  # a quota above the affinity changes nothing
    assert usable_cores(tmp_path) == affinity


def test_default_leaves_a_core_and_an_explicit_count_wins(tmp_path):
    assert [default_cpu_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]
    write(tmp_path, "cpu.max", "300000 100000")
    assert resolve_cpu_threads(None, tmp_path) == min(2, max(1, len(os.sched_getaffinity(0)) - 1))
    assert resolve_cpu_threads(5, tmp_path) == 5
