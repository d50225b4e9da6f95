"""Compute threads on a shared CPU: llmctl's default vs torch's default, idle and with every core kept busy.

    python scripts/bench_contention.py --out bench-contention.json
    python scripts/bench_contention.py --rounds 5 --seconds 15 --max-tokens 48

One process loads the model as `llmctl serve` does (embedded SmolLM2 by default, at its default dtype)
and builds two builtin engines on it: "llmctl", with `llmctl serve`'s default (the adaptive thread
count), and "torch", pinned to torch's default (one thread per core). In each round, first idle and
then while another process keeps every usable core busy (scripts/busy_cores.py: a session of its own,
one spinning worker per core; ``--busy-workers`` and ``--busy-sessions`` make that load heavier),
each engine generates greedily for one stream and then for 16 streams
at once, each stream up to ``--max-tokens`` new tokens or ``--seconds``, whichever ends first (tok/s =
new tokens over the wall time, prefill included). The two engines take turns within the same minute,
so on a machine whose other load comes and goes, each round's ratio compares them under about the
same load; the table gives each cell's median over the rounds, and the median of the per-round
ratios. The llmctl engine keeps its tuner across rounds, as a running server would. "cpu" is the
cores' worth of CPU time this process got while it generated. Every measurement has a deadline, so
a run takes at most rounds x 2 x 2 x 2 x ``--seconds`` plus the load; the busy workers end with the
script however it ends (Ctrl-C, SIGTERM, an error, being killed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from busy_cores import KINDS, BusyCores, Terminated, kind_problem, on_sigterm  # noqa: E402  (not a package)

CONDITIONS = ("idle", "busy")
MODES = ("torch", "llmctl")
STREAMS = (1, 16)
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def engines(model_path: str | None):
    """The loaded model, and the two engines on it: llmctl's default and torch's default thread count."""
    import torch

    from llmctl.core import threads
    from llmctl.core.loader import LoadOptions, load_model
    from llmctl.engine import BuiltinEngine, EngineConfig
    from llmctl.engine.builtin_setup import BuiltinOptions

    torch_default = torch.get_num_threads()
    policy = threads.configure_cpu_threads(None)  # what `llmctl serve` does without --cpu-threads
    loaded, ours = BuiltinOptions().build(LoadOptions(model_path=Path(model_path) if model_path else None),
                                          EngineConfig(), load_model)
    # torch's default, set by its engine thread (torch's count is per thread in OpenMP); a fixed policy has no trials.
    pinned = threads.ThreadTuner(threads.ThreadPolicy(cores=policy.cores, fixed=torch_default,
                                                      current=torch_default))
    theirs = BuiltinEngine(loaded.model, loaded.eos_token_ids, EngineConfig(), tokenizer=loaded.tokenizer,
                           threads=pinned)
    for engine in (ours, theirs):
        engine.start()
    return loaded, {"llmctl": ours, "torch": theirs}, policy


def generate(engine, ids: list[int], streams: int, tokens: int, seconds: float) -> dict:
    """``streams`` greedy streams of up to ``tokens`` tokens, ended at ``seconds``: tok/s and CPU share."""
    from llmctl.engine import Finish, SamplingParams, Sequence

    deadline = time.monotonic() + seconds
    seqs = [Sequence(list(ids), SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
                     deadline=deadline) for _ in range(streams)]
    before, cpu, started = engine.stats.tokens_generated, _cpu_seconds(), time.perf_counter()
    for seq in seqs:
        engine.submit(seq)
    for seq in seqs:
        while not isinstance(seq.events.get(timeout=seconds + 120), Finish):  # a bound for a hang only
            pass
    wall = time.perf_counter() - started
    return {"tok_s": (engine.stats.tokens_generated - before) / wall, "cpu": (_cpu_seconds() - cpu) / wall}


def run(args: argparse.Namespace, console: Console) -> list[dict]:
    """Every round's measurements, one dict per (round, condition, mode, streams)."""
    from llmctl.bench.offline import chat_texts

    loaded, by_mode, policy = engines(args.model_path)
    tok = loaded.tokenizer
    ids = tok(chat_texts(tok, [PROMPT])[0], add_special_tokens=False)["input_ids"]
    rows = []
    try:
        for engine in by_mode.values():  # warm-up: the first passes are slower, and not what a server's user sees
            generate(engine, ids, 1, 4, args.seconds)
        for round_ in range(args.rounds):
            for condition in CONDITIONS:
                with contextlib.ExitStack() as busy:
                    if condition == "busy":
                        for _ in range(args.busy_sessions):
                            busy.enter_context(BusyCores(args.busy_workers or policy.cores,
                                                         args.busy_session == "own", args.busy_kind,
                                                         args.busy_share))
                    for mode in MODES if round_ % 2 == 0 else MODES[::-1]:  # neither always goes first
                        for streams in STREAMS:
                            cell = generate(by_mode[mode], ids, streams, args.max_tokens, args.seconds)
                            engine = by_mode[mode]
                            cell.update(round=round_, condition=condition, mode=mode, streams=streams,
                                        threads=engine.threads.policy.current if engine.threads else None)
                            rows.append(cell)
                            console.print(json.dumps(cell), highlight=False)
    finally:
        for engine in by_mode.values():
            engine.stop()
    console.print(f"llmctl's thread count changed {policy.switches} time(s) over the run", highlight=False)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of every cell (the table gives medians).")
    parser.add_argument("--seconds", type=float, default=15.0, help="Most seconds one measurement may take.")
    parser.add_argument("--max-tokens", type=int, default=48, help="New tokens per stream (fewer if --seconds ends).")
    parser.add_argument("--busy-session", choices=("own", "same"), default="own",
                        help="The busy workers in a session of their own (another user's job; the default) or in "
                        "this one (sharing its CPU thread by thread, as without autogroup scheduling).")
    parser.add_argument("--busy-workers", type=int, default=None,
                        help="Spinning workers in the busy process (default: one per usable core).")
    parser.add_argument("--busy-kind", choices=sorted(KINDS), default="spin",
                        help="What the busy workers do (scripts/busy_cores.py --kind).")
    parser.add_argument("--busy-share", type=float, default=0.5,
                        help="With --busy-kind steal: the share of each core taken away (busy_cores.py --share).")
    parser.add_argument("--log-trials", action="store_true",
                        help="Print the thread tuner's switches and lost trials (to stderr) as they happen.")
    parser.add_argument("--busy-sessions", type=int, default=1,
                        help="Busy processes, each in a session of its own with --busy-session own.")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    if args.log_trials:  # the tuner's switches (info) and lost trials (debug), as they happen
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        tuner_log = logging.getLogger("llmctl.core.threads")
        tuner_log.setLevel(logging.DEBUG)
        tuner_log.addHandler(handler)
    if problem := kind_problem(args.busy_kind, args.busy_share):
        parser.error(problem.replace("--kind", "--busy-kind").replace("--share", "--busy-share"))
    signal.signal(signal.SIGTERM, on_sigterm)  # unwind: the busy workers end on the way out
    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LLMCTL_CPU_THREADS"):
        if name in os.environ:
            sys.exit(f"unset {name}: this benchmark compares the defaults")
    from llmctl.core.threads import usable_cores

    console = Console(width=200 if not sys.stdout.isatty() else None)
    load = os.getloadavg()[0]
    started = time.monotonic()
    try:
        rows = run(args, console)
    except (KeyboardInterrupt, Terminated):  # the busy workers and the engines were ended on the way out
        sys.exit("interrupted")
    end_load = os.getloadavg()[0]

    def cells(condition: str, mode: str, streams: int) -> list[dict]:
        return [r for r in rows if (r["condition"], r["mode"], r["streams"]) == (condition, mode, streams)]

    table = Table(title=f"tok/s through the builtin engine, median of {args.rounds} round(s); busy: "
                        f"{args.busy_sessions} x {args.busy_workers or usable_cores()} {args.busy_kind} worker(s)"
                        f"{f' taking {args.busy_share:.0%} of a core each' if args.busy_kind == 'steal' else ''} in "
                        f"{args.busy_session} session; {usable_cores()} "
                        f"usable cores; 1-min load average {load:.1f} at the start, {end_load:.1f} at the end; "
                        f"{time.monotonic() - started:.0f} s")
    for column in ("condition", "streams", "torch tok/s", "cpu", "llmctl tok/s", "cpu", "llmctl threads",
                   "llmctl/torch (median of rounds)"):
        table.add_column(column)
    ratios = {}
    for condition in CONDITIONS:
        for streams in STREAMS:
            theirs, ours = cells(condition, "torch", streams), cells(condition, "llmctl", streams)
            ratio = statistics.median(o["tok_s"] / t["tok_s"] for o, t in zip(ours, theirs, strict=True))
            ratios[f"{condition}_{streams}"] = ratio
            table.add_row(condition, str(streams), f"{statistics.median(r['tok_s'] for r in theirs):.1f}",
                          f"{statistics.median(r['cpu'] for r in theirs):.2f}",
                          f"{statistics.median(r['tok_s'] for r in ours):.1f}",
                          f"{statistics.median(r['cpu'] for r in ours):.2f}",
                          ",".join(str(r["threads"]) for r in ours), f"{ratio:.2f}x")
    console.print(table)
    if args.out:
        args.out.write_text(json.dumps({"cores": usable_cores(), "load_average": [load, end_load], "rows": rows,
                                        "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
