"""Torch's compute threads: the cores this process may use, and a count that follows how busy the machine is.

On an idle machine torch's default (one OpenMP thread per core) is the fastest. On a machine that
other processes also use, every parallel region waits for a thread the kernel has descheduled, and
decoding slows by several times, 10x or more under heavy load; one thread then wins. Neither count
suits both, and which one holds changes while a server runs, so by default the builtin engine picks it
as it goes (`ThreadTuner`): it starts with every usable core (its CPU affinity, capped by its cgroup's
quota), now and then runs a few decode steps at the next count down (or up) and keeps whichever made
its steps faster. `--cpu-threads N` fixes the count instead. OpenMP's own wait policy is left alone:
its idle threads spin briefly before they sleep, which is what makes an idle machine's 2 threads fast
(with the passive policy one stream on 2 idle cores made 12.1 tok/s instead of 19 to 23).
docs/benchmarks.md has the measurements (scripts/bench_contention.py).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

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


def thread_levels(cores: int) -> list[int]:
    """The counts the tuner moves between: every usable core, halved down to 1 (2 cores: 1 and 2)."""
    levels = {1}
    n = cores
    while n > 1:
        levels.add(n)
        n //= 2
    return sorted(levels)


@dataclass
class ThreadPolicy:
    """How this process sets torch's compute threads: fixed (``--cpu-threads``) or chosen while it runs."""

    cores: int  # usable cores
    fixed: int | None  # --cpu-threads; None: adaptive
    current: int  # the count in use now
    switches: int = 0  # times the tuner changed the count
    tuned: bool = False  # an engine tunes the count (the builtin engine on CPU); else it stays as it started

    @property
    def mode(self) -> str:
        """What /health reports: "adaptive" once an engine tunes the count, else "fixed"."""
        return "adaptive" if self.tuned else "fixed"

    def describe(self) -> str:
        """For the start-up log and `llmctl doctor`."""
        if self.fixed:
            return f"{self.fixed} torch thread(s), fixed by --cpu-threads, of {self.cores} usable core(s)"
        if self.cores < 2:
            return "1 torch thread (1 usable core)"
        levels = thread_levels(self.cores)
        return (f"adaptive torch threads ({', '.join(map(str, levels))}: the faster one while it runs, "
                f"starting at {levels[-1]}) of {self.cores} usable core(s)")

    def report(self) -> dict:
        """What /health and /metrics show."""
        return {"cpu_threads": self.current, "cpu_threads_policy": self.mode}


_policy: ThreadPolicy | None = None


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def configure_cpu_threads(requested: int | None, root: Path = CGROUP_ROOT) -> ThreadPolicy:
    """Set this process's compute threads up: ``requested`` (--cpu-threads) fixes the count; None lets the
    builtin engine choose it (`tuner`), starting with every usable core."""
    global _policy
    cores = usable_cores(root)
    start = requested or cores
    set_torch_threads(start)
    _policy = ThreadPolicy(cores=cores, fixed=requested, current=start)
    return _policy


def policy() -> ThreadPolicy:
    """This process's policy; one nothing configured (a service built in a test) is torch's count, fixed."""
    if _policy is not None:
        return _policy
    import torch

    threads = torch.get_num_threads()
    return ThreadPolicy(cores=usable_cores(), fixed=threads, current=threads)


def reset_policy() -> None:
    """Forget the configured policy (tests)."""
    global _policy
    _policy = None


def tuner() -> ThreadTuner | None:
    """A tuner for the builtin engine's decode steps on CPU when the count is not fixed and there is more than
    one to try (the policy then reports "adaptive")."""
    current = _policy
    if current is None or current.fixed or current.cores < 2:
        return None
    return ThreadTuner(current)


@dataclass
class _Trial:
    threads: int  # the count on trial
    current: int  # the count it is compared with
    rows: int
    steps: int  # its steps at each count
    times: dict[int, list[float]] = field(default_factory=dict)

    def next_count(self) -> int:
        """Its steps take turns: the trial count, the current one, the trial count, ..."""
        done = sum(map(len, self.times.values()))
        return self.threads if done % 2 == 0 else self.current

    @property
    def complete(self) -> bool:
        return all(len(self.times.get(n, ())) >= self.steps for n in (self.threads, self.current))

    def medians(self) -> tuple[float, float]:
        """The trial count's median step and the current count's, over the trial."""
        return statistics.median(self.times[self.threads]), statistics.median(self.times[self.current])


class ThreadTuner:
    """Keeps the faster compute-thread count, measured on the engine's own decode steps.

    Decode steps of the same batch size take about the same time at one count, so the tuner keeps the
    last few step times at the current count and, when a trial is due, runs ``trial_steps`` steps at a
    neighbouring count (the next one down and the next one up, in turn), taking turns step by step with
    as many at the current count, so that both are measured under the same outside load even when it
    changes by the second. The trial count is kept when its median step is at least ``1 - margin``
    times the current count's over the trial; a trial step ``give_up`` times as slow as the current
    count's usual step ends the trial at once, so a losing trial costs about one slow step. Trials come
    ``first_interval_s``
    apart after a switch and twice as far apart after each loss, up to ``max_interval_s``: on a machine
    whose load does not change, they cost a few percent at most. When the steps at the current count
    become ``change`` times slower or faster than they settled at (other work started or stopped), a
    trial comes at once. The engine calls `before_step` and
    `after_step` around each decode step, on its own thread (torch's thread count is set by the thread
    that computes).
    """

    def __init__(self, policy: ThreadPolicy, *, trial_steps: int = 3, baseline_steps: int = 8,
                 margin: float = 0.15, give_up: float = 2.0, change: float = 1.5, first_interval_s: float = 2.0,
                 max_interval_s: float = 60.0, stale_s: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 apply: Callable[[int], None] = set_torch_threads) -> None:
        self.policy = policy
        policy.tuned = not policy.fixed  # a fixed policy's tuner only sets its count in the engine's thread
        self.levels = thread_levels(policy.cores)
        if policy.current not in self.levels:
            self.levels = sorted({*self.levels, policy.current})
        self.trial_steps, self.margin, self.give_up, self.change = trial_steps, margin, give_up, change
        self.min_baseline = min(4, baseline_steps)
        self.first_interval_s, self.max_interval_s, self.stale_s = first_interval_s, max_interval_s, stale_s
        self.interval_s = first_interval_s
        self.clock, self.apply = clock, apply
        self._baseline: deque[tuple[float, float]] = deque(maxlen=baseline_steps)  # (when, seconds)
        self._rows = 0  # the batch size the baseline was measured at
        self._settled: float | None = None  # the baseline's median step when it was last judged
        self._trial: _Trial | None = None
        self._next_trial = 0.0  # the first trial as soon as there is a baseline
        self._down = True  # the direction of the next trial
        self._applied: int | None = None  # the count this thread set last

    def before_step(self, rows: int) -> None:
        """Start a trial when one is due and the current count has a baseline at this batch size."""
        now = self.clock()
        if self._trial is None and now >= self._next_trial and rows == self._rows and \
                len(self._baseline) >= self.min_baseline:
            candidate = self._neighbour()
            if candidate is not None:
                self._trial = _Trial(candidate, self.policy.current, rows, self.trial_steps)
        self._use(self._trial.next_count() if self._trial else self.policy.current)

    def after_step(self, rows: int, seconds: float) -> None:
        """Record a decode step of ``rows`` rows that took ``seconds``."""
        now = self.clock()
        trial = self._trial
        if trial is None:
            if rows != self._rows or (self._baseline and now - self._baseline[-1][0] > self.stale_s):
                self._baseline.clear()  # another batch size, or measured before a pause: not comparable
                self._rows, self._settled = rows, None
            self._baseline.append((now, seconds))
            if len(self._baseline) >= self.min_baseline:
                median = statistics.median(s for _, s in self._baseline)
                if self._settled is None:
                    self._settled = median
                elif not self._settled / self.change < median < self._settled * self.change:
                    self._next_trial, self.interval_s, self._settled = now, self.first_interval_s, median
            return
        if rows != trial.rows:  # the batch changed under the trial: no verdict, try again soon
            self._end_trial(now, won=None)
            return
        used = self._applied if self._applied is not None else self.policy.current
        trial.times.setdefault(used, []).append(seconds)
        if used == trial.threads and seconds > self.give_up * statistics.median(s for _, s in self._baseline):
            self._end_trial(now, won=False)
        elif trial.complete:
            ours, theirs = trial.medians()
            self._end_trial(now, won=ours < (1 - self.margin) * theirs)

    def _neighbour(self) -> int | None:
        if self.policy.fixed:
            return None
        i = self.levels.index(self.policy.current)
        lower = self.levels[i - 1] if i > 0 else None
        higher = self.levels[i + 1] if i + 1 < len(self.levels) else None
        first, second = (lower, higher) if self._down else (higher, lower)
        self._down = not self._down
        return first if first is not None else second

    def _end_trial(self, now: float, won: bool | None) -> None:
        trial, self._trial = self._trial, None
        assert trial is not None
        if won:
            ours, theirs = trial.medians()
            log.info("Compute threads: %d -> %d (decode steps %.0f%% faster)", self.policy.current, trial.threads,
                     100 * (theirs / ours - 1))
            self.policy.current = trial.threads
            self.policy.switches += 1
            self._baseline.clear()
            self._baseline.extend((now, s) for s in trial.times[trial.threads])
            self._settled = ours
            self.interval_s = self.first_interval_s
        elif won is False:
            self.interval_s = min(self.max_interval_s, 2 * self.interval_s)
        self._next_trial = now + (self.first_interval_s if won is None else self.interval_s)
        self._use(self.policy.current)

    def _use(self, threads: int) -> None:
        if threads != self._applied:
            self.apply(threads)
            self._applied = threads
