"""One compute thread against two, measured directly: the figures behind the thread tuner's rules.

    python scripts/thread_counts.py matmul --busy-kind steal --busy-workers 1 --busy-share 0.9
    python scripts/thread_counts.py steps

``matmul``: iterations per second of a loop of one-row matrix products (``tanh(x @ w)``, 576x1536, 30 to an
iteration), at two threads and at one, idle and beside the load scripts/busy_cores.py makes (the options
are bench_contention.py's): how much a parallel region's barrier costs when the other thread's core is
taken away. ``steps``: the builtin engine's decode steps for 16 streams of the embedded model, at two
threads, at one, and alternating between them step by step as the tuner's trials do (median step time at
each count), and the time to prefill the 16 prompts (one token each) at each count. Every measurement is
repeated ``--rounds`` times, in turns, and the medians are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_contention import PROMPT, engines, generate  # noqa: E402  (scripts/ is not a package)
from busy_cores import KINDS, BusyCores, kind_problem  # noqa: E402


def matmul(args: argparse.Namespace) -> None:
    import torch

    weights = torch.randn(576, 1536)
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for condition in ("idle", "busy"):
            with contextlib.ExitStack() as busy:
                if condition == "busy":
                    busy.enter_context(BusyCores(args.busy_workers, True, args.busy_kind, args.busy_share))
                    time.sleep(0.3)  # the workers start
                for threads in (2, 1):
                    torch.set_num_threads(threads)
                    x, done, started = torch.randn(1, 576), 0, time.perf_counter()
                    while time.perf_counter() - started < args.seconds:
                        for _ in range(30):
                            x = torch.tanh(x @ weights)[:, :576]
                        done += 1
                    rates.setdefault((condition, threads), []).append(done / (time.perf_counter() - started))
    for (condition, threads), values in rates.items():
        print(f"{condition:5} {threads} thread(s): {statistics.median(values):7.1f} iterations/s")


class Pattern:
    """Stands in for the engine's `ThreadTuner`: each decode step's count comes from ``pattern`` in turn, and
    the time of each 16-row step is kept by the count it ran at. Prefills run at ``prefill``."""

    def __init__(self, pattern: list[int], prefill: int = 2) -> None:
        self.pattern, self.prefill, self.steps = pattern, prefill, 0
        self.applied: int | None = None
        self.times: dict[int, list[float]] = {}

    def count(self, rows: int) -> int:
        return self.pattern[self.steps % len(self.pattern)]

    def prepare(self, size: int) -> int:
        self._use(self.prefill)
        return self.prefill

    def before_step(self, shape: tuple[int, int]) -> None:
        self._use(self.count(shape[0]))

    def after_step(self, shape: tuple[int, int], seconds: float) -> None:
        if shape[0] == 16:
            self.times.setdefault(self.applied or 0, []).append(seconds)
        self.steps += 1

    def _use(self, threads: int) -> None:
        from llmctl.core.threads import set_torch_threads

        if threads != self.applied:
            set_torch_threads(threads)
            self.applied = threads


def steps(args: argparse.Namespace) -> None:
    from llmctl.bench.offline import chat_texts
    from llmctl.engine import BuiltinEngine, EngineConfig

    loaded, made, _ = engines(args.model_path)
    for engine in made.values():
        engine.stop()
    tok = loaded.tokenizer
    ids = tok(chat_texts(tok, [PROMPT])[0], add_special_tokens=False)["input_ids"]

    def engine(tuner: Pattern) -> BuiltinEngine:
        made = BuiltinEngine(loaded.model, loaded.eos_token_ids, EngineConfig(), tokenizer=loaded.tokenizer,
                             threads=tuner)  # a stand-in for the tuner
        made.start()
        return made

    patterns = {"two threads": [2], "one thread": [1], "alternating": [2, 1]}
    tuners = {name: Pattern(pattern) for name, pattern in patterns.items()}
    prefill = {n: Pattern([n], prefill=n) for n in (2, 1)}
    runs = {name: engine(tuner) for name, tuner in {**tuners, **{f"prefill {n}": p for n, p in prefill.items()}}
            .items()}
    prefill_s: dict[int, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for name in tuners:
                generate(runs[name], ids, 16, 32, 60)
            for n in prefill:
                started = time.perf_counter()
                generate(runs[f"prefill {n}"], ids, 16, 1, 60)
                prefill_s.setdefault(n, []).append(time.perf_counter() - started)
    finally:
        for made_engine in runs.values():
            made_engine.stop()
    print(f"16 streams of {len(ids)} prompt tokens, {args.rounds} round(s); median 16-row decode step:")
    for name, tuner in tuners.items():
        print(f"  {name:12}", ", ".join(f"{statistics.median(t) * 1000:.1f} ms at {n}"
                                        for n, t in sorted(tuner.times.items(), reverse=True)))
    print("prefill of the 16 prompts (first token):",
          ", ".join(f"{statistics.median(t):.3f} s at {n}" for n, t in prefill_s.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("matmul", "steps"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="matmul: seconds of each measurement.")
    parser.add_argument("--model-path", default=None, help="steps: the model (default: the embedded SmolLM2).")
    parser.add_argument("--busy-kind", choices=sorted(KINDS), default="steal")
    parser.add_argument("--busy-workers", type=int, default=None, help="Default: one per usable core.")
    parser.add_argument("--busy-share", type=float, default=0.5)
    args = parser.parse_args()
    if problem := kind_problem(args.busy_kind, args.busy_share):
        parser.error(problem.replace("--kind", "--busy-kind").replace("--share", "--busy-share"))
    (matmul if args.what == "matmul" else steps)(args)


if __name__ == "__main__":
    main()
