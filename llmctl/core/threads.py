"""Torch's compute threads: the cores this process may use, and a count that follows how busy the machine is.

On an idle machine torch's default (one OpenMP thread per core) is the fastest. On a machine that
other processes also use, every parallel region waits for a thread the kernel has descheduled, and
decoding slows by several times, 10x or more under heavy load; one thread then wins. Neither count
suits both, and which one holds changes while a server runs, so by default the builtin engine picks it
as it goes (`ThreadTuner`): it starts with every usable core (its CPU affinity, capped by its cgroup's
quota), now and then runs a few decode steps at the next count down (or up) and keeps whichever made
its steps faster, for each batch size apart (the best count depends on it too). `--cpu-threads N`
fixes the count instead. OpenMP's own wait policy is left alone: its idle threads spin briefly before
they sleep, which is what makes an idle machine's 2 threads fast (with the passive policy one stream
on 2 idle cores made 12.1 tok/s instead of 19 to 23).
docs/benchmarks.md has the measurements (scripts/bench_contention.py).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections import Counter, deque
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
        return (f"adaptive torch threads ({', '.join(map(str, levels))}: the faster one per batch size while it runs, "
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


Shape = tuple[int, int]  # a decode step's rows and tokens fed


def batch_class(rows: int) -> int:
    """The batch-size class of a step of ``rows`` rows, each with a count of its own: 1 row, 2-3, 4-7, 8-15, ..."""
    return rows.bit_length()


@dataclass
class _Trial:
    threads: int  # the count on trial
    current: int  # the count it is compared with
    shape: Shape  # the steps it is measured on
    steps: int  # its steps at each count
    usual: float  # the current count's median step of this shape just before the trial
    others: int = 0  # steps of other shapes of its class since its last step
    extended: bool = False  # it looked faster without the margin, and runs longer
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


@dataclass
class _Baseline:
    """The latest steps of one shape at the current count, and their median when it was last judged."""

    times: deque[tuple[float, float]]  # (when, seconds)
    settled: float | None = None

    def median(self, latest: int | None = None) -> float:
        """The median of the ``latest`` steps (all by default)."""
        return statistics.median(s for _, s in list(self.times)[-(latest or len(self.times)):])


class ThreadTuner:
    """Keeps the faster compute-thread count for each batch size, measured on the engine's own decode steps.

    Which count is faster depends on the batch: beside other work in the same session, one thread made one
    stream's steps faster and two made 16 streams' faster (two threads get more of the cores' time, and 16 rows
    have the work to use it). So the steps are split into batch-size classes by their rows, in powers of two (1,
    2-3, 4-7, 8-15, ...: `batch_class`), and each class has a count, trials, baselines and schedule of its own
    (`_ClassTuner`), as below. A class not seen before starts at the count of the nearest class seen (of two
    as near, the larger one's; of none, the policy's starting count, every usable core), and gets its first trial
    as soon as it has a baseline. `before_step` sets the count of the step's class (or its trial's); after the
    step, that class's count is set again and is the policy's ``current`` (what /health, /metrics and `llmctl
    doctor` report). `prepare` sets the count for a pass outside a decode step: a prefill runs at the count of
    the class nearest its tokens, as a pass over many tokens has the work of a large batch (not the count one
    stream chose, which a burst of requests that follows it would otherwise be prefilled at), and a draft
    model's proposals at their batch's. `count` is a class's count before its step (the speculator weighs
    drafts with the timings of that count); ``switches`` counts the changes of every class.

    Within a class, steps are compared only with steps of the same shape (the engine passes the rows and the
    tokens fed, which a speculating step's drafts add to): those take about the same time at one count. The class
    keeps the last ``baseline_steps`` step times of each shape at its count and, when a trial is due, runs
    ``trial_steps`` steps of its commonest recent shape at a neighbouring count (the next one down and the next
    one up, in turn), taking turns with as many steps of that shape at its count, so that both are measured
    under the same outside load even when it changes by the second. Steps of its other shapes meanwhile run at
    its count and leave the trial alone; a trial whose shape does not come in ``2 * baseline_steps`` steps of its
    class, or whose class has no step for ``stale_s``, ends without a verdict. A trial of fewer threads is kept
    when its median step is at least ``1 - margin`` times the current count's over the trial, one of more
    threads when at least ``1 - margin_up``: a count below every core (torch's own default) has to earn its
    place, and the way back needs less (on idle cores a second thread makes 16 rows' steps 5-15% faster, within
    the first margin: with one margin, a class that went to one thread under load stayed there once the load
    had gone). Between the two no trial wins, so a steady load does not flap. A trial whose count was faster,
    but not by its margin, goes on to three times its steps before its verdict: three steps of each count
    are enough to see a count twice as slow, not always one 10% faster. A trial step ``give_up``
    times as slow as the current count's latest steps of that shape ends the trial at once, so a losing trial
    costs about one slow step.

    A class's trials come ``first_interval_s`` apart after a switch and twice as far apart after each loss, up to
    ``max_interval_s`` at every usable core and ``below_top_interval_s`` below (where the end of other work may
    not show in the steps: one thread on a core of its own can be nearly as fast beside it), but never closer
    than keeps the time a lost trial cost within ``budget`` of the time to the next one: on a machine whose load
    does not change, a class's trials cost 3% at most. When the median of a shape's full baseline becomes
    ``change`` times slower or faster than it settled at (other work started or stopped), a trial comes at once,
    towards fewer threads when the steps slowed and more when they sped up (none when there is no count that
    way); after a pause of more than ``stale_s`` without steps of a class below every core, a trial of more
    threads comes as soon as the class has a baseline again, since the other work may have ended meanwhile and
    the fresh baseline has nothing to compare with (at every core, the trials' interval finds work that started
    during a pause). The engine calls `before_step` and `after_step` around each decode step, on its own thread
    (torch's thread count is set by the thread that computes).
    """

    def __init__(self, policy: ThreadPolicy, *, trial_steps: int = 3, baseline_steps: int = 16,
                 margin: float = 0.15, margin_up: float = 0.05, give_up: float = 2.0, change: float = 1.25,
                 first_interval_s: float = 2.0,
                 max_interval_s: float = 60.0, below_top_interval_s: float = 20.0, budget: float = 0.03,
                 stale_s: float = 10.0, shapes: int = 32, clock: Callable[[], float] = time.monotonic,
                 apply: Callable[[int], None] = set_torch_threads) -> None:
        self.policy = policy
        policy.tuned = not policy.fixed  # a fixed policy's tuner only sets its count in the engine's thread
        self.levels = thread_levels(policy.cores)
        if policy.current not in self.levels:
            self.levels = sorted({*self.levels, policy.current})
        self.trial_steps, self.margin, self.margin_up = trial_steps, margin, margin_up
        self.give_up, self.change = give_up, change
        self.baseline_steps, self.min_baseline = baseline_steps, min(4, baseline_steps)
        self.first_interval_s, self.max_interval_s, self.stale_s = first_interval_s, max_interval_s, stale_s
        self.below_top_interval_s, self.budget, self.shapes = below_top_interval_s, budget, shapes
        self.clock, self.apply = clock, apply
        self.classes: dict[int, _ClassTuner] = {}  # by batch_class
        self._applied: int | None = None  # the count this thread set last

    @property
    def applied(self) -> int | None:
        """The count the step between `before_step` and `after_step` runs at (a trial's or its class's)."""
        return self._applied

    def count(self, rows: int) -> int:
        """The count a step of ``rows`` rows runs at unless it is a trial's: its class's, or the one a class not
        seen yet starts at."""
        tuning = self.classes.get(batch_class(rows))
        return tuning.current if tuning is not None else self._start(batch_class(rows))

    def _start(self, size: int) -> int:
        if not self.classes:
            return self.policy.current  # every usable core (or the fixed count) until a class has a count
        return self.classes[min(self.classes, key=lambda c: (abs(c - size), -c))].current

    def _class(self, shape: Shape) -> _ClassTuner:
        size = batch_class(shape[0])
        tuning = self.classes.get(size)
        if tuning is None:
            tuning = self.classes[size] = _ClassTuner(self, size, self._start(size))
        return tuning

    def before_step(self, shape: Shape) -> None:
        """Set the count of this step's class, or its trial's: one starts when it is due and the class has a
        baseline for steps of this shape."""
        tuning = self._class(shape)
        threads = tuning.before_step(shape, self.clock())
        self.policy.current = tuning.current
        self._use(threads)

    def after_step(self, shape: Shape, seconds: float) -> None:
        """Record a decode step of this shape that took ``seconds``."""
        tuning = self._class(shape)
        tuning.after_step(shape, self.clock(), seconds, self._applied if self._applied is not None else tuning.current)
        # Until something else asks (`prepare`, the next step), this class's count.
        self.policy.current = tuning.current
        self._use(tuning.current)

    def prepare(self, size: int) -> int:
        """Set (and return) the count for a pass outside a decode step over ``size`` rows or prompt tokens: the
        count of the class nearest that many rows (no trial runs on it, and the policy's ``current`` stays the
        latest decode step's class's)."""
        threads = self.count(size)
        self._use(threads)
        return threads

    def _use(self, threads: int) -> None:
        if threads != self._applied:
            self.apply(threads)
            self._applied = threads


class _ClassTuner:
    """One batch-size class's count, its trials and their schedule, and the baselines of its steps' shapes."""

    def __init__(self, tuner: ThreadTuner, size: int, current: int) -> None:
        self.tuner, self.size, self.current = tuner, size, current
        self.interval_s = tuner.first_interval_s
        self.trial: _Trial | None = None
        self._baselines: dict[Shape, _Baseline] = {}  # by shape, the least recently measured first
        self._recent: deque[Shape] = deque(maxlen=2 * tuner.baseline_steps)  # the latest steps' shapes
        self._next_trial = 0.0  # the first trial as soon as there is a baseline
        self._last_step: float | None = None  # when its last step ended
        self._budget_until = 0.0  # no trial before this: what the last lost trial cost, spread out by the budget
        self._down = True  # the direction of the next trial
        self._toward: bool | None = None  # a change's direction (True: fewer threads) for the trial it calls

    @property
    def rows(self) -> str:
        """Its rows, for the log: "1", "2-3", "4-7", ..."""
        low = 1 << (self.size - 1)
        return str(low) if low == 1 else f"{low}-{2 * low - 1}"

    def before_step(self, shape: Shape, now: float) -> int:
        """The count this step runs at: its trial's turn, or the class's."""
        t, trial = self.tuner, self.trial
        paused = self._last_step is None or now - self._last_step > t.stale_s
        if trial is not None and paused:  # its turns would straddle the pause: measured under other loads
            self._end_trial(now, won=None)
            trial = None
        if trial is None and paused and self.current != t.levels[-1]:
            # Below every core: other work may have ended during a pause, and baselines measured after it cannot
            # show that: a trial (of more threads first) as soon as there is one again, within the time budget.
            self._toward = False
            self._next_trial = max(self._budget_until, min(self._next_trial, now))
            self._recent.clear()  # and the commonest shape is the one that comes now
        if trial is not None and shape != trial.shape:
            trial.others += 1
            if trial.others > 2 * t.baseline_steps:  # its shape stopped coming: no verdict
                self._end_trial(now, won=None)
                trial = None
        self._recent.append(shape)
        if trial is None and not t.policy.fixed and now >= self._next_trial and \
                shape == Counter(self._recent).most_common(1)[0][0]:
            baseline = self._baseline(shape, now)  # trials are run on the commonest shape: they end sooner
            if len(baseline.times) >= t.min_baseline:
                candidate = self._neighbour()
                if candidate is not None:
                    trial = self.trial = _Trial(candidate, self.current, shape, t.trial_steps,
                                                baseline.median(t.min_baseline))
        return trial.next_count() if trial is not None and trial.shape == shape else self.current

    def after_step(self, shape: Shape, now: float, seconds: float, used: int) -> None:
        """Record a step of this shape that took ``seconds`` at ``used`` threads."""
        self._last_step = now
        trial = self.trial
        if trial is not None and shape == trial.shape:
            trial.times.setdefault(used, []).append(seconds)
            trial.others = 0
            if used == trial.threads and seconds > self.tuner.give_up * trial.usual:
                self._end_trial(now, won=False)
            elif trial.complete:
                ours, theirs = trial.medians()
                margin = self.tuner.margin_up if trial.threads > self.current else self.tuner.margin
                if ours < (1 - margin) * theirs:
                    self._end_trial(now, won=True)
                elif ours < theirs and not trial.extended:  # faster, not by the margin: three medians' worth
                    trial.steps, trial.extended = 3 * trial.steps, True
                else:
                    self._end_trial(now, won=False)
        elif used == self.current:
            self._observe(shape, now, seconds)

    def _baseline(self, shape: Shape, now: float) -> _Baseline:
        """The shape's baseline (a new one where there is none, forgetting the least recent shape's), emptied when
        its last step is older than ``stale_s``: measured before a pause, not comparable."""
        t = self.tuner
        baseline = self._baselines.pop(shape, None)
        if baseline is None:
            baseline = _Baseline(deque(maxlen=t.baseline_steps))
            while len(self._baselines) >= t.shapes:
                del self._baselines[next(iter(self._baselines))]
        elif baseline.times and now - baseline.times[-1][0] > t.stale_s:
            baseline.times.clear()
            baseline.settled = None
        self._baselines[shape] = baseline  # now the most recent
        return baseline

    def _observe(self, shape: Shape, now: float, seconds: float) -> None:
        baseline = self._baseline(shape, now)
        baseline.times.append((now, seconds))
        if len(baseline.times) < self.tuner.baseline_steps:
            return
        median = baseline.median()
        if baseline.settled is None:
            baseline.settled = median
        elif not baseline.settled / self.tuner.change < median < baseline.settled * self.tuner.change:
            slower, baseline.settled = median > baseline.settled, median
            if self._neighbours()[0 if slower else 1] is not None:  # else there is no count that way to try
                self._next_trial, self._toward = now, slower

    def _neighbours(self) -> tuple[int | None, int | None]:
        """The next count down and the next one up, where there is one."""
        levels = self.tuner.levels
        i = levels.index(self.current)
        return (levels[i - 1] if i > 0 else None), (levels[i + 1] if i + 1 < len(levels) else None)

    def _neighbour(self) -> int | None:
        lower, higher = self._neighbours()
        down = self._toward if self._toward is not None else self._down
        if self._toward is None:
            self._down = not self._down
        self._toward = None
        first, second = (lower, higher) if down else (higher, lower)
        return first if first is not None else second

    def _end_trial(self, now: float, won: bool | None) -> None:
        t, trial, self.trial = self.tuner, self.trial, None
        assert trial is not None
        if won:
            ours, theirs = trial.medians()
            log.info("Compute threads for steps of %s row(s): %d -> %d (decode steps %.0f%% faster)", self.rows,
                     self.current, trial.threads, 100 * (theirs / ours - 1))
            self.current = trial.threads
            t.policy.switches += 1
            self._baselines.clear()  # measured at the count before
            self._baseline(trial.shape, now).times.extend((now, s) for s in trial.times[trial.threads])
            self.interval_s, self._toward = t.first_interval_s, None
        elif won is False:
            ours, theirs = trial.medians() if trial.complete else (trial.times[trial.threads][-1], trial.usual)
            log.debug("Compute threads for steps of %s row(s): %d kept (a trial of %d: steps %.0f%% %s)",
                      self.rows, self.current, trial.threads, 100 * abs(theirs / ours - 1),
                      "faster" if ours < theirs else "slower")
        lost = 0.0 if won else sum(s - trial.usual for s in trial.times.get(trial.threads, ()))  # what it cost
        if won is False:
            top = self.current == t.levels[-1]
            cap = t.max_interval_s if top else min(t.max_interval_s, t.below_top_interval_s)
            self.interval_s = max(min(cap, 2 * self.interval_s), lost / t.budget)
        self._budget_until = now + lost / t.budget
        if self._toward is not None:  # the load changed during the trial: another one at once
            self._next_trial = now
        else:
            wait = t.first_interval_s if won is None else self.interval_s
            self._next_trial = max(now + wait, self._budget_until)
