"""Compute threads: the cores a process may use (affinity, cgroup quota), and the tuner that picks the count."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from llmctl.core import threads
from llmctl.core.threads import ThreadPolicy, ThreadTuner, cgroup_cpu_limit, thread_levels, usable_cores


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


def test_the_levels_halve_from_every_core_down_to_one():
    assert [thread_levels(n) for n in (1, 2, 3, 4, 16)] == [[1], [1, 2], [1, 3], [1, 2, 4], [1, 2, 4, 8, 16]]


@pytest.fixture()
def configured():
    """configure_cpu_threads sets the process's policy and torch's count: both put back afterwards."""
    import torch

    before = torch.get_num_threads()
    yield threads.configure_cpu_threads
    threads.reset_policy()
    torch.set_num_threads(before)


def test_adaptive_by_default_fixed_by_a_count(configured, tmp_path):
    import torch

    write(tmp_path, "cpu.max", "100000 100000")  # one core: nothing to choose between
    assert threads.tuner() is None  # nothing configured (a service built in a process of its own)
    assert configured(None, tmp_path).current == 1 and threads.tuner() is None
    assert threads.policy().mode == "fixed"
    cores = usable_cores()
    adaptive = configured(None)
    assert adaptive.current == cores == torch.get_num_threads()
    if cores > 1:  # "adaptive" once an engine has a tuner for it
        assert adaptive.mode == "fixed" and threads.tuner() is not None
        assert threads.policy().report() == {"cpu_threads": cores, "cpu_threads_policy": "adaptive"}
    fixed = configured(1)
    assert fixed.mode == "fixed" and torch.get_num_threads() == 1 and threads.tuner() is None
    assert "fixed by --cpu-threads" in fixed.describe()


class Steps:
    """A tuner driven by a fake clock and step times that depend on the thread count it applies and on the step's
    shape (rows, tokens fed: each drafted token fed makes a step a quarter dearer); ``by_rows`` gives the steps of
    some row counts times of their own. The tuner keeps a count and a trial schedule for each batch-size class:
    the tests of one class's steps read its state in ``tuner.classes[1]`` (1 row)."""

    def __init__(self, cores: int, seconds_at: dict[int, float], **kw) -> None:
        self.now, self.seconds_at, self.applied = 0.0, dict(seconds_at), []
        self.by_rows: dict[int, dict[int, float]] = {}
        self.load: Callable[[float], float] = lambda now: 1.0  # how much slower outside load makes a step now
        self.policy = ThreadPolicy(cores=cores, fixed=None, current=cores)
        self.tuner = ThreadTuner(self.policy, clock=lambda: self.now, apply=self.applied.append, **kw)

    def run(self, n: int, shape: Callable[[int], tuple[int, int]] = lambda step: (1, 1)) -> list[int]:
        """``n`` decode steps, step i of shape ``shape(i)``; the thread count each ran at."""
        used = []
        for i in range(n):
            rows, fed = shape(i)
            self.tuner.before_step((rows, fed))
            threads_now = self.applied[-1]
            used.append(threads_now)
            seconds = self.by_rows.get(rows, self.seconds_at)[threads_now] * self.load(self.now) * \
                (1 + 0.25 * (fed - rows))
            self.now += seconds
            self.tuner.after_step((rows, fed), seconds)
        return used


def test_the_tuner_keeps_every_core_on_an_idle_machine_and_backs_off_its_trials():
    steps = Steps(2, {2: 0.04, 1: 0.06})
    used = steps.run(3000)
    assert steps.policy.current == 2 and steps.policy.switches == 0
    assert used[:4] == [2] * 4 and 1 in used  # it measured 2 first, then tried 1
    # Each losing trial is one step or a few; they come further apart each time, up to once a minute.
    assert used.count(1) <= 3 * 8 and steps.tuner.classes[1].interval_s == 60.0


def test_the_tuner_drops_to_one_thread_when_the_cores_get_busy_and_comes_back():
    steps = Steps(2, {2: 0.04, 1: 0.06})
    steps.run(200)
    steps.seconds_at = {2: 0.6, 1: 0.15}  # other work spins on both cores
    used = steps.run(400)
    assert steps.policy.current == 1 and steps.policy.switches == 1
    # Steps 15 times slower call for a trial at once (the median of the 16-step baseline moves within 9 steps),
    # whatever the interval the losing trials on the idle machine had grown to. At 2 threads, then: those steps,
    # the trial's 3 turns at the current count, and one step for each later trial of 2 (2, 4, 8 and 16 s after
    # the switch, then every 20 s: at most 6 in this minute).
    assert used[:10].count(1) >= 1 and used.count(2) <= 8 + 3 + 6
    steps.seconds_at = {2: 0.04, 1: 0.06}  # the other work ended
    steps.run(2000)
    assert steps.policy.current == 2 and steps.policy.switches == 2


def test_a_step_of_another_shape_runs_at_the_current_count_and_leaves_the_trial_alone():
    steps = Steps(2, {2: 0.6, 1: 0.15})  # busy cores: 1 thread wins
    steps.run(4)  # the baseline of 1-row plain steps: a trial is due at once
    steps.tuner.before_step((1, 1))
    assert steps.applied[-1] == 1  # a trial began
    steps.tuner.after_step((1, 1), 0.15)
    assert steps.applied[-1] == 2  # between steps (prefills, a draft model's proposals): the current count
    # A verifying step, a grown batch (a batch-size class not seen yet: it starts at the 1-row class's count):
    # they say nothing about a 1-row plain step.
    for shape in [(1, 5), (16, 16)]:
        steps.tuner.before_step(shape)
        assert steps.applied[-1] == 2
        steps.tuner.after_step(shape, 0.001)
    assert steps.run(5) == [2, 1, 2, 1, 2] and steps.policy.current == 1 and steps.policy.switches == 1


@pytest.mark.parametrize("kinds", [[(1, 1), (1, 3), (1, 6)], [(2, 2), (2, 5), (3, 3), (3, 8)]])
def test_speculating_steps_of_changing_shapes_still_get_verdicts(kinds):
    """One stream that verifies 0, 2 or 5 drafts at random from step to step (or 2 and 3 rows, one batch-size
    class, with and without drafts): trials are measured on one shape and judged, so the tuner still follows the
    load, and steps at the losing count stay few."""
    shapes = random.Random(0).choices(kinds, k=20000)
    steps = Steps(2, {2: 0.04, 1: 0.06})
    used = steps.run(3000, shapes.__getitem__)
    assert steps.policy.switches == 0 and used.count(1) <= 3 * 8
    steps.seconds_at = {2: 0.6, 1: 0.15}
    used = steps.run(400, lambda i: shapes[3000 + i])
    # The commonest shape's median moves within about 27 steps; its trial takes turns among the other shapes'
    # steps. After the switch (within 50 steps), a step at 2 for each later trial of 2 (every 20 s at most).
    assert steps.policy.current == 1 and steps.policy.switches == 1 and used[50:].count(2) <= 8
    steps.seconds_at = {2: 0.04, 1: 0.06}
    used = steps.run(100, lambda i: shapes[3400 + i])
    assert steps.policy.current == 2 and steps.policy.switches == 2 and used[-50:].count(1) <= 3


def test_a_trial_whose_steps_stop_coming_ends_without_a_verdict():
    steps = Steps(2, {2: 0.6, 1: 0.15}, baseline_steps=4)
    steps.run(4)
    steps.tuner.before_step((1, 1))
    steps.tuner.after_step((1, 1), 0.15)  # the trial's first step at 1 thread
    assert steps.run(9, lambda i: (1, 6)) == [2] * 9  # twice 4 steps without its shape: the trial is over
    assert steps.tuner.classes[1].trial is None and steps.policy.current == 2 and steps.policy.switches == 0
    assert steps.run(1) == [2]  # the next trial comes after first_interval_s


def test_a_trial_whose_class_pauses_ends_without_a_verdict():
    steps = Steps(2, {2: 0.6, 1: 0.15})
    steps.run(4)
    steps.tuner.before_step((1, 1))
    steps.tuner.after_step((1, 1), 0.15)  # the trial's first step at 1 thread
    steps.now += 30.0  # no 1-row step for 30 s: its next turns would be measured under another load
    assert steps.run(4) == [2] * 4 and steps.tuner.classes[1].trial is None and steps.policy.switches == 0
    # A new baseline meanwhile, and a new trial first_interval_s (2 s) after the one that ended: it wins.
    assert steps.run(6) == [1, 2, 1, 2, 1, 2] and steps.policy.current == 1 and steps.policy.switches == 1


def test_a_small_gain_within_the_margin_does_not_switch():
    steps = Steps(2, {2: 0.040, 1: 0.038})  # 5% faster: noise, not worth flapping for
    steps.run(2000)
    assert steps.policy.current == 2 and steps.policy.switches == 0


def test_a_class_that_went_down_under_load_comes_back_for_a_small_gain():
    """16 rows beside other work: one thread wins by far; the work ends and two threads are 8% faster again,
    within the margin for fewer threads: the smaller margin for more threads brings the class back."""
    steps = Steps(2, {2: 0.6, 1: 0.15})
    sixteen = lambda step: (16, 16)  # noqa: E731
    steps.run(200, sixteen)
    assert steps.tuner.classes[5].current == 1
    steps.seconds_at = {2: 0.046, 1: 0.050}
    steps.run(2000, sixteen)
    assert steps.tuner.classes[5].current == 2 and steps.policy.switches == 2
    # And it stays there: a trial of one thread does not win back for 8%.
    steps.run(3000, sixteen)
    assert steps.tuner.classes[5].current == 2 and steps.policy.switches == 2


def test_four_cores_step_down_one_level_at_a_time():
    steps = Steps(4, {4: 0.5, 2: 0.1, 1: 0.2})
    steps.run(400)
    assert steps.policy.current == 2 and steps.tuner.levels == [1, 2, 4]


def test_a_fixed_policy_only_sets_its_count():
    applied: list[int] = []
    policy = ThreadPolicy(cores=4, fixed=3, current=3)
    tuner = ThreadTuner(policy, apply=applied.append, clock=lambda: 1000.0)
    for seconds in [0.1] * 10 + [5.0] * 10:  # steps that slow down would call for a trial
        tuner.before_step((1, 1))  # a shape is (rows, tokens fed): the rows choose the batch-size class
        tuner.after_step((1, 1), seconds)
    assert applied == [3] and policy.mode == "fixed" and policy.switches == 0


def test_outside_load_that_comes_and_goes_does_not_pass_for_a_faster_count():
    """Both counts equally fast, on a machine whose other load swings steps between 1x and 3x their time
    every 2 s: a trial measured after its baseline would often look faster (or slower); its turns with the
    current count, step by step, do not."""
    steps = Steps(2, {2: 0.05, 1: 0.05}, change=100.0)  # the swings alone must not call for trials either
    steps.load = lambda now: 1.0 + abs((now % 4.0) - 2.0)
    steps.run(3000)
    assert steps.policy.switches == 0


def test_a_load_that_goes_away_brings_more_threads_back_at_once():
    """Under busy cores at 1 thread the trials of 2 lose until they come 20 s apart; when the other work ends, one
    thread's step gets only 1.4 times faster (a benchmark saw 1.45x, less than the 1.5 that called for a trial
    before). A median 1.25 times faster calls for one, towards more threads."""
    steps = Steps(2, {2: 0.04, 1: 0.06})
    steps.run(200)
    steps.seconds_at = {2: 0.6, 1: 0.084}
    steps.run(2000)
    assert steps.policy.current == 1 and steps.tuner.classes[1].interval_s == 20.0
    steps.seconds_at = {2: 0.04, 1: 0.06}
    used = steps.run(40)
    # The baseline's median moves within 9 steps; then 3 turns at each count.
    assert 2 in used[:10] and used[16:] == [2] * 24 and steps.policy.current == 2


def test_below_every_core_a_trial_of_more_comes_at_least_every_20_s():
    """One thread on a core of its own can run as fast beside other work as without it: then nothing in its steps
    says that the other work ended, and only the trials find it. Below every core they come at least every 20 s,
    each one slow step while the cores stay busy."""
    steps = Steps(2, {2: 0.04, 1: 0.06})
    steps.run(200)
    steps.seconds_at = {2: 0.6, 1: 0.06}
    used = steps.run(4000)  # 4 minutes
    assert steps.policy.current == 1 and steps.tuner.classes[1].interval_s == 20.0
    # At 2 threads: the steps before the trial, its 3 turns at 2, and a step for each later trial of 2 (2, 4, 8
    # and 16 s after the switch, then every 20 s: 4 + 12).
    assert used.count(2) <= 5 + 3 + 16
    steps.seconds_at = {2: 0.04, 1: 0.06}
    started = steps.now
    used = steps.run(400)
    assert steps.policy.current == 2 and steps.policy.switches == 2
    assert sum(steps.seconds_at[n] for n in used[:used.index(2)]) <= 20.0
    assert started + 20.0 + 6 * 0.06 >= steps.now - sum(steps.seconds_at[n] for n in used[used.index(2) + 6:])


def test_steps_that_speed_up_try_more_threads_first():
    steps = Steps(4, {4: 0.5, 2: 0.1, 1: 0.2})  # busy cores: 2 threads are the fastest
    steps.run(400)
    assert steps.policy.current == 2
    steps.seconds_at = {4: 0.02, 2: 0.05, 1: 0.1}  # the other work ended: all cores win
    used = steps.run(30)
    assert next(n for n in used if n != 2) == 4 and steps.policy.current == 4


def test_steps_that_vary_by_a_fifth_call_for_few_trials_more():
    """On a steady machine whose steps vary by up to 20% at random, the median of 8 steps seldom moves by a
    quarter: the trials at the losing count stay about those of the back-off alone."""
    rng = random.Random(1)
    steps = Steps(2, {2: 0.04, 1: 0.06})
    steps.load = lambda now: rng.uniform(0.8, 1.2)
    used = steps.run(6000)  # 4 minutes
    assert steps.policy.switches == 0
    assert used.count(1) <= 3 * 11  # trials 2, 4, ..., 32 s apart, then every 60 s: 10 in 4 minutes, and one more


def test_trials_that_cost_much_come_seldom():
    """16 streams on busy cores: a step takes 1.5 s at 1 thread and 6 s at 2. A lost trial of 2 costs 4.5 s, so
    the next comes no sooner than 150 s later (3% of the time), not every 20 s."""
    steps = Steps(2, {2: 0.04, 1: 0.06})
    steps.run(200)
    steps.seconds_at = {2: 6.0, 1: 1.5}
    used = steps.run(400)  # 10 minutes
    assert steps.policy.current == 1 and steps.tuner.classes[1].interval_s >= 150.0
    # Switched within 20 steps; then a trial of 2 steps 2 s later and one every 150 s at most (every 20 s: 28).
    assert used[20:].count(1) >= 370 and used[20:].count(2) <= 1 + 4


@pytest.mark.parametrize("shape", [(1, 1), (16, 16)])
def test_after_a_pause_a_trial_comes_as_soon_as_there_are_steps_again(shape):
    """The other work ends while the server is between requests: the next request's steps have no baseline from
    before to compare with, so a trial comes as soon as they have one (a benchmark saw a server stay at one
    thread through a 16-stream request after busy cores went quiet). The request has the rows measured before
    (the pause rule of their class), or 16 (a class not seen yet: it starts at the 1-row class's count and gets
    its first trial as soon as it has a baseline)."""
    steps = Steps(2, {2: 0.04, 1: 0.06})
    steps.run(200)
    steps.seconds_at = {2: 0.6, 1: 0.15}
    steps.run(400)
    assert steps.policy.current == 1
    steps.now += 30.0  # a pause, during which the other work ended
    steps.seconds_at = {2: 0.04, 1: 0.06}
    used = steps.run(16, lambda i: shape)
    assert used[0] == 1 and 2 in used[:6] and steps.policy.current == 2 and used[-6:] == [2] * 6


def test_pauses_at_every_core_call_for_no_more_trials():
    """Requests of 20 steps with 15 s between them on a steady idle machine, at every core: the pauses call for
    no trials of their own, only the interval's (2, 4, ... 32 s apart, then one a minute: 32 in 27 minutes)."""
    steps = Steps(2, {2: 0.04, 1: 0.06})
    used = []
    for _ in range(100):
        used += steps.run(20)
        steps.now += 15.0
    assert steps.policy.switches == 0 and steps.now < 27 * 60
    assert used.count(1) <= 3 * 32


def alternating(steps: Steps, phases: int, seconds: float = 10.0) -> dict[int, list[int]]:
    """``phases`` phases of ``seconds`` each, of 1-row steps then 16-row steps in turn; the counts each row count's
    steps ran at."""
    used: dict[int, list[int]] = {1: [], 16: []}
    for phase in range(phases):
        rows, end = (1, 16)[phase % 2], steps.now + seconds
        while steps.now < end:
            used[rows] += steps.run(1, lambda i, rows=rows: (rows, rows))
    return used


def test_each_batch_size_keeps_its_own_faster_count():
    """Busy workers in the same session (a benchmark on 2 cores): one stream's steps are faster at one thread, 16
    streams' at two (they get more of the cores' time: 167 against 131 tok/s). Phases of 10 s of each in turn: the
    1-row steps settle at one thread and the 16-row steps at two, and stay there, whatever the trials of the other
    class lost meanwhile (with one count for all steps, a 16-stream phase ran at one thread: 0.79x)."""
    steps = Steps(2, {})
    steps.by_rows = {1: {1: 0.10, 2: 0.14}, 16: {1: 16 / 131, 2: 16 / 167}}
    used = alternating(steps, 12)  # 2 minutes
    one, sixteen = steps.tuner.classes[1], steps.tuner.classes[5]
    assert one.current == 1 and sixteen.current == 2 and steps.tuner.count(1) == 1 and steps.tuner.count(16) == 2
    assert steps.policy.switches == 2  # once each: no flapping between the phases
    # 1 row at 2 threads: the first baseline and trial (4 + 3 steps); then in each of the 6 phases the trial of 2
    # that the pause calls for (below every core; 3 steps, none twice as slow) and at most one of the interval's.
    assert used[1].count(2) <= 7 + 6 * (3 + 3)
    # 16 rows at 1 thread: the count inherited from 1 row until its first trial (4 + 3 steps); then a trial of 1
    # now and then (2, 4, 8, 16, 32, 60 s apart: 3 steps each, at most 6 in these 2 minutes).
    assert used[16].count(1) <= 7 + 6 * 3
    assert used[16][-50:] == [2] * 50 and used[1][-50:] == [1] * 50


def test_a_batch_size_not_seen_yet_starts_at_the_nearest_ones_count():
    steps = Steps(2, {})
    assert [steps.tuner.count(rows) for rows in (1, 5, 64)] == [2, 2, 2]  # none seen yet: every core
    steps.by_rows = {1: {1: 0.10, 2: 0.14}, 16: {1: 0.12, 2: 0.09}}
    alternating(steps, 2)
    assert steps.tuner.count(1) == 1 and steps.tuner.count(16) == 2
    # 2-3 rows start next to 1 row (1 thread), 8-15 next to 16-31 (2); 4-7, as near to both, at the larger's.
    assert [steps.tuner.count(rows) for rows in (2, 3, 4, 7, 8, 15, 100)] == [1, 1, 2, 2, 2, 2, 2]
    steps.by_rows = {2: {1: 0.10, 2: 0.14}, 8: {1: 0.12, 2: 0.09}}
    assert steps.run(1, lambda i: (2, 2)) == [1] and steps.policy.current == 1  # reports the latest step's class
    assert steps.applied[-1] == 1  # and runs what comes until the next step (a draft model's passes) at its count
    # The new class's first trial comes as soon as it has a baseline (4 steps): 2 rows try 2 threads, and lose.
    assert steps.run(6, lambda i: (2, 2)) == [1, 1, 1, 2, 1, 2]
    assert steps.run(5, lambda i: (8, 8)) == [2, 2, 2, 2, 1] and steps.policy.current == 2
    assert steps.applied[-1] == 2 and steps.tuner.count(2) == 1


def test_a_prefill_runs_at_the_count_of_the_class_nearest_its_tokens():
    """Beside same-session workers one stream's steps want one thread and 16 streams' two; a prefill pass of 300
    prompt tokens has the work of the large batch, and runs at its count, whichever decode step came last."""
    steps = Steps(2, {})
    steps.by_rows = {1: {1: 0.10, 2: 0.14}, 16: {1: 0.12, 2: 0.09}}
    alternating(steps, 2)
    steps.run(8)  # 1-row steps last: the policy reports their count, one thread
    assert steps.policy.current == 1 and steps.applied[-1] == 1
    steps.tuner.prepare(300)
    assert steps.applied[-1] == 2 and steps.policy.current == 1  # what /health reports stays the decode steps'
    steps.tuner.prepare(1)  # one token: the 1-row class's
    assert steps.applied[-1] == 1
    assert steps.run(1, lambda i: (16, 16)) == [2] and steps.policy.current == 2


def test_a_trial_that_looks_faster_without_the_margin_runs_longer_before_its_verdict():
    """At one thread, a trial of two whose first three steps happen to be only 2% faster (the machine's noise) is
    not lost at once: it runs nine steps of each count, and their medians show two threads 15% faster."""
    now = [0.0]
    policy = ThreadPolicy(cores=2, fixed=None, current=1)
    tuner = ThreadTuner(policy, clock=lambda: now[0], apply=lambda threads: None)
    two = iter([0.099, 0.098, 0.097] + [0.085] * 6)
    used = []
    for _ in range(4 + 2 * 9):
        tuner.before_step((16, 16))
        used.append(tuner.applied)
        seconds = next(two) if tuner.applied == 2 else 0.100
        now[0] += seconds
        tuner.after_step((16, 16), seconds)
    assert used == [1] * 4 + [2, 1] * 9
    assert tuner.classes[5].current == 2 and policy.switches == 1
