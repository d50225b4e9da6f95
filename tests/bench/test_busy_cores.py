"""scripts/busy_cores.py: the command runs beside spinning workers, and the workers end on every way out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "busy_cores.py"
pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads processes from /proc")


def processes() -> list[tuple[int, list[bytes]]]:
    """Every process's pid and arguments."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            found.append((int(entry.name), (entry / "cmdline").read_bytes().split(b"\0")))
        except (OSError, ValueError):
            continue
    return found


def workers_of(parent: int) -> list[int]:
    """The pids of the busy process started by ``parent`` and of its forks (they share its command line)."""
    return [pid for pid, args in processes() if str(SCRIPT).encode() in args and b"--workers" in args
            and args[args.index(b"--parent") + 1] == str(parent).encode()]


def start(*command: str, flags: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), "--cores", "2", *flags, "--", *command],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kind", ["spin", "bursty", "torch"])
def test_the_command_runs_beside_the_workers_and_its_status_is_kept(kind):
    # The command exits 3 when it sees its parent's two workers running, 4 otherwise.
    code = ("import os; from tests.bench.test_busy_cores import workers_of; "
            "raise SystemExit(3 if len(workers_of(os.getppid())) == 2 else 4)")
    busy = start(sys.executable, "-c", code, flags=("--kind", kind))
    _, err = busy.communicate(timeout=120)
    assert busy.returncode == 3, err
    assert workers_of(busy.pid) == []
    assert f"2 {kind} worker(s)" in err and "workers ended" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="real-time priority needs root")
def test_steal_workers_take_a_core_each_at_real_time_priority():
    # The command exits 3 once its parent's two workers run under SCHED_FIFO, each kept to a core of its own.
    code = ("import os, time; from tests.bench.test_busy_cores import workers_of\n"
            "def ok():\n"
            "    pids = workers_of(os.getppid())\n"
            "    cores = [frozenset(os.sched_getaffinity(p)) for p in pids]\n"
            "    return len(pids) == 2 and all(os.sched_getscheduler(p) == os.SCHED_FIFO for p in pids) and \\\n"
            "        all(len(c) == 1 for c in cores) and len(set(cores)) == min(2, len(os.sched_getaffinity(0)))\n"
            "deadline = time.monotonic() + 60\n"
            "while not ok() and time.monotonic() < deadline: time.sleep(0.05)\n"
            "raise SystemExit(3 if ok() else 4)")
    busy = start(sys.executable, "-c", code, flags=("--kind", "steal", "--share", "0.2"))
    _, err = busy.communicate(timeout=120)
    assert busy.returncode == 3, err
    assert workers_of(busy.pid) == [] and "2 steal worker(s)" in err


def test_a_share_outside_what_a_core_has_is_refused_before_anything_runs():
    busy = start(sys.executable, "-c", "raise SystemExit(0)", flags=("--kind", "steal", "--share", "0.95"))
    _, err = busy.communicate(timeout=60)
    assert busy.returncode == 2 and "--share is a fraction of each core" in err and "worker(s)" not in err


@pytest.mark.parametrize("flags", [(), ("--same-session",)])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_the_workers_end_however_the_script_is_stopped(sig, flags):
    marker = f"busy-cores-test-{sig.name}-{len(flags)}"
    busy = start(sys.executable, "-c", "import time; time.sleep(600)", marker, flags=flags)
    try:
        assert wait_for(lambda: len(workers_of(busy.pid)) == 2, 60)
        workers = workers_of(busy.pid)
        # A session of their own by default (another user's job); the script's with --same-session.
        assert {os.getsid(pid) == os.getsid(busy.pid) for pid in workers} == {bool(flags)}
        busy.send_signal(sig)
        busy.wait(60)
        # The command (a child of the script) and every worker are gone; SIGKILL leaves no handler to run,
        # so there the kernel ends the workers (PR_SET_PDEATHSIG).
        assert wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in workers), 30)
        command = [pid for pid, args in processes() if marker.encode() in args and _alive(pid)]
        if sig == signal.SIGKILL:  # the command outlives a killed script, as any child would: ended here
            for pid in command:
                os.kill(pid, signal.SIGKILL)
        else:
            assert busy.returncode == 130 and command == []
    finally:
        if busy.poll() is None:
            busy.kill()
            busy.wait()


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to collect it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False
