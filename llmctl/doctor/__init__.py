"""`llmctl doctor`'s checks: the machine (Python, packages, CUDA, bitsandbytes, disk), the model files
(`modelcheck`), whether the model fits in memory (`fit`, from its config alone), and the network side
(`network`: the port, a running service). `checks.run_doctor` runs them all into a `Report`.

May import: llmctl.core, llmctl.client (to probe a running service as any client would),
llmctl.errors, llmctl.envvars. Never the server or the engine.
"""
