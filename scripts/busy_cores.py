"""Run a command while every usable core is kept busy by another process: a shared, loaded machine on demand.

    python scripts/busy_cores.py -- make test
    python scripts/busy_cores.py --cores 1 -- python -m pytest -q tests/server

The busy process is one session of its own (as another user's job would be: with the kernel's
autogroup scheduling, the CPU is then shared between that job and the command, not thread by
thread) holding one worker per usable core, each spinning in a loop (``--kind`` picks other work: bursts
between sleeps, torch's parallel products, or a virtual machine's steal time). The workers end on every way
out: when the command ends, on Ctrl-C or SIGTERM (which the command gets too), and if this script
itself is killed (the kernel ends each worker with its parent: PR_SET_PDEATHSIG). The exit status is
the command's. `BusyCores` is the same as a context manager (scripts/bench_contention.py uses it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent ends (Linux); exit now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def _spin(index: int, share: float) -> None:
    while True:
        pass


def _bursty(index: int, share: float) -> None:
    """Work in bursts of 1 to 4 ms with sleeps of 0.2 to 2 ms between, as request-serving processes do: a
    waking task takes its core back from whatever runs there."""
    import random
    import time

    rng = random.Random(os.getpid())
    while True:
        end = time.perf_counter() + rng.uniform(0.001, 0.004)
        while time.perf_counter() < end:
            pass
        time.sleep(rng.uniform(0.0002, 0.002))


def _torch(index: int, share: float) -> None:
    """Parallel matrix products with torch's default threads (one per core), as another model's job would."""
    import torch

    weights, x = torch.randn(1024, 1024), torch.randn(16, 1024)
    while True:
        torch.nn.functional.gelu(x @ weights)


def _steal(index: int, share: float) -> None:
    """Take one core away in bursts, as a virtual machine's host does when it runs another guest there (steal
    time): the worker keeps to the ``index``-th usable core and runs at real-time priority (SCHED_FIFO), so no
    ordinary thread runs on that core during a burst. Bursts of 2 to 20 ms, with idle gaps between that leave
    the core to others 1 - ``share`` of the time. Needs root (CAP_SYS_NICE); the kernel keeps 5% of each
    second for ordinary work whatever happens."""
    import random
    import time

    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[index % len(cores)]})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except PermissionError:
        print("busy_cores: --kind steal needs root (real-time priority)", file=sys.stderr)
        os._exit(2)
    rng = random.Random(index)
    while True:
        burst = rng.uniform(0.002, 0.020)
        end = time.perf_counter() + burst
        while time.perf_counter() < end:
            pass
        time.sleep(burst * (1 - share) / share)


KINDS = {"spin": _spin, "bursty": _bursty, "torch": _torch, "steal": _steal}


def kind_problem(kind: str, share: float) -> str | None:
    """Why workers of ``kind`` taking ``share`` of a core cannot run here; None when they can."""
    if kind == "steal" and os.geteuid() != 0:
        return "--kind steal needs root: its workers run at real-time priority"
    if not 0 < share <= 0.9:
        return "--share is a fraction of each core, above 0 and at most 0.9"
    return None


def _workers(count: int, parent: int, kind: str = "spin", share: float = 0.5) -> None:
    """The busy process: ``count`` workers of ``kind`` (itself and count - 1 forks), each ending with its parent."""
    _die_with_parent(parent)
    if os.getpgid(0) != os.getpid():  # not a session of its own: a process group of its own, to be killed as one
        os.setpgid(0, 0)
    me, work = os.getpid(), KINDS[kind]
    for index in range(1, count):
        if os.fork() == 0:
            _die_with_parent(me)
            work(index, share)
    work(0, share)


class BusyCores:
    """Keep ``cores`` cores busy while the block runs; the workers are killed, as a group, when it ends.

    ``own_session`` False puts the workers in this process's session instead: with autogroup scheduling
    they then share this session's CPU thread by thread (as a `make -j` started from the same shell, or a
    machine without autogroups), instead of taking a session's share of the machine.
    """

    def __init__(self, cores: int | None = None, own_session: bool = True, kind: str = "spin",
                 share: float = 0.5) -> None:
        if cores is None:
            from llmctl.core.threads import usable_cores

            cores = usable_cores()
        self.cores, self.own_session, self.kind, self.share = cores, own_session, kind, share
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> BusyCores:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--workers", str(self.cores),
                                      "--parent", str(os.getpid()), "--kind", self.kind, "--share", str(self.share)],
                                     start_new_session=self.own_session)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group it leads: every worker
        # Stopped before it made its group (it has no forks then): the process itself; forks die with it anyway.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class Terminated(Exception):
    """SIGTERM arrived: unwind (the workers and the command are ended on the way out)."""


def on_sigterm(signum: int, frame: types.FrameType | None) -> None:
    raise Terminated


def run(command: list[str], cores: int | None, own_session: bool = True, kind: str = "spin",
        share: float = 0.5) -> int:
    """``command``'s exit status, run while ``cores`` workers of ``kind`` keep the cores busy."""
    signal.signal(signal.SIGTERM, on_sigterm)
    child: subprocess.Popen | None = None
    try:
        with BusyCores(cores, own_session, kind, share) as busy:
            print(f"busy_cores: {busy.cores} {kind} worker(s); running {' '.join(command)}", file=sys.stderr)
            child = subprocess.Popen(command)
            return child.wait()
    except (KeyboardInterrupt, Terminated):
        return 130
    finally:
        if child is not None and child.poll() is None:  # interrupted: the command ends too
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        print("busy_cores: workers ended", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cores", type=int, default=None, help="Workers to run (default: every usable core).")
    parser.add_argument("--same-session", action="store_true",
                        help="Workers in this session, sharing its CPU thread by thread (see BusyCores).")
    parser.add_argument("--kind", choices=sorted(KINDS), default="spin",
                        help="spin: busy loops (default); bursty: 1-4 ms bursts between short sleeps; torch: "
                        "parallel matrix products on torch's default threads; steal: each core taken away half the "
                        "time in 2-20 ms bursts at real-time priority, as a VM host's steal time (needs root).")
    parser.add_argument("--share", type=float, default=0.5,
                        help="With --kind steal: the share of each core taken away (default 0.5).")
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="The command, after --.")
    args = parser.parse_args()
    if args.workers:
        _workers(args.workers, args.parent, args.kind, args.share)
        return
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if problem := kind_problem(args.kind, args.share):
        parser.error(problem)
    sys.exit(run(command, args.cores, not args.same_session, args.kind, args.share))


if __name__ == "__main__":
    main()
