"""`llmctl bench`: a streaming load generator against any OpenAI-compatible server (`loadgen`), its
prompts (`prompts`) and measurements (`stats`), reports in tables/JSON/CSV/plots (`report`), and the
raw `model.generate` baseline (`offline`).

May import: llmctl.core (the offline baseline loads a model), llmctl.client (server URLs),
llmctl.errors, llmctl.envvars. Never the server or the engine.
"""
