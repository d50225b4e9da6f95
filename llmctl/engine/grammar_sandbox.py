"""Grammar validation in child processes with a memory cap and a time limit, so no constraint can take the server down.

llguidance's compiler allocates what a grammar asks for and aborts the process when an allocation
fails (a Rust abort, which no Python code can catch); its own ParserLimits do not prevent that
(``"minItems": 1000000000`` still aborts with max_grammar_size 10,000 and initial_lexer_fuel 1,000:
the allocation comes while the schema is turned into a grammar). `grammar_limits` rejects the known ways to
ask for too much before this; whatever slips through is validated here first, in a worker whose
address space is capped (`resource.setrlimit(RLIMIT_AS)`): a worker that dies or overruns its
time is replaced, and the request gets a 400. Workers are kept between requests (one starts in
a fraction of a second), at most ``workers`` at once.
"""

from __future__ import annotations

import json
import logging
import select
import subprocess
import sys
import threading
from pathlib import Path

from llmctl.engine.grammar_limits import LimitExceeded

log = logging.getLogger(__name__)

MEMORY_BYTES = 1 << 30  # a worker's address space; a grammar llguidance validates in 1 GiB is safe to compile
TIMEOUT_S = 10.0  # wall time for one validation
WORKERS = 2
_SCRIPT = Path(__file__).with_name("grammar_worker.py")


class _Worker:
    def __init__(self, memory_bytes: int) -> None:
        # The worker's own abort message (a Rust backtrace) is of no use to anyone: not logged.
        self.proc = subprocess.Popen([sys.executable, str(_SCRIPT), str(memory_bytes)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self.proc.stdin is None or self.proc.stdout is None:  # never with PIPE: for the type checker
            raise RuntimeError("the grammar worker has no pipes")
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout

    def ask(self, grammar: str, timeout: float) -> str | None:
        """llguidance's verdict ("" when valid); None when the worker died or ran out of time (then it is gone)."""
        try:
            self.stdin.write(json.dumps(grammar) + "\n")
            self.stdin.flush()
            ready, _, _ = select.select([self.stdout], [], [], timeout)
            line = self.stdout.readline() if ready else ""
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.close()
            return None
        return json.loads(line)["error"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class CompileSandbox:
    """Validates llguidance grammars (JSON text) in capped worker processes; thread-safe."""

    def __init__(self, memory_bytes: int = MEMORY_BYTES, timeout_s: float = TIMEOUT_S, workers: int = WORKERS) -> None:
        self.memory_bytes = memory_bytes
        self.timeout_s = timeout_s
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(workers)

    def validate(self, grammar: str) -> str:
        """llguidance's error for ``grammar`` ("" when it is valid); LimitExceeded when validating it would
        need more memory or time than the sandbox allows."""
        with self._slots:
            with self._lock:
                worker = self._idle.pop() if self._idle else None
            worker = worker or _Worker(self.memory_bytes)
            verdict = worker.ask(grammar, self.timeout_s)
            if verdict is None:
                died = worker.proc.returncode not in (None, -9)
                log.warning("A grammar of %d bytes %s its validation worker", len(grammar),
                            "crashed" if died else "timed out")
                if died:
                    raise LimitExceeded(f"compiling it needs more than the {self.memory_bytes >> 20} MiB of "
                                        "memory the server allows a grammar")
                raise LimitExceeded(f"compiling it takes longer than the {self.timeout_s:g} s the server allows")
            with self._lock:
                self._idle.append(worker)
            return verdict

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


_sandbox: CompileSandbox | None = None
_sandbox_lock = threading.Lock()


def sandbox() -> CompileSandbox:
    """The process's sandbox, made on first use."""
    global _sandbox
    with _sandbox_lock:
        if _sandbox is None:
            _sandbox = CompileSandbox()
        return _sandbox
