"""scripts/thread_counts.py: its matrix-product probe runs at both counts, idle and beside busy workers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "thread_counts.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_matmul_reports_each_count_idle_and_busy():
    done = run("matmul", "--rounds", "1", "--seconds", "0.2", "--busy-kind", "spin")
    assert done.returncode == 0, done.stderr
    found = re.findall(r"^(idle|busy)\s+(\d) thread\(s\):\s+([\d.]+) iterations/s$", done.stdout, re.M)
    assert [(c, n) for c, n, _ in found] == [("idle", "2"), ("idle", "1"), ("busy", "2"), ("busy", "1")]
    assert all(float(rate) > 0 for _, _, rate in found)


def test_a_share_a_core_does_not_have_is_refused():
    done = run("matmul", "--busy-share", "1.5")
    assert done.returncode == 2 and "--busy-share is a fraction of each core" in done.stderr
