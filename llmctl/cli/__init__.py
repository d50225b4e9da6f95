"""The `llmctl` command line: one thin module per command, wired together in `app`; shared option
types in `options`, consoles in `output`.

May import any part of llmctl (it is the top).
"""
