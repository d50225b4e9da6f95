"""A child process that validates llguidance grammars under a memory cap; run as a script, never imported.

It reads one JSON line per grammar on stdin and writes ``{"error": "..."}`` (empty when the grammar
is fine) on stdout. Its address space is capped first (argv[1], bytes), so a grammar that makes
the compiler allocate without bound aborts this process, never the server. It imports only the
standard library and llguidance (no llmctl, no torch) so that it starts in a fraction of a second.
"""

import json
import resource
import sys


def main() -> None:
    cap = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import llguidance

    # The same parser limits as the server's matchers (llguidance's ParserLimits), terse errors.
    limits = llguidance.LLParserLimits(verbose_errors=False)
    for line in sys.stdin:
        grammar = json.loads(line)
        error = llguidance.LLMatcher.validate_grammar(grammar, None, limits=limits)
        sys.stdout.write(json.dumps({"error": error}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
