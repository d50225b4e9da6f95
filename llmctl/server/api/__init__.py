"""The APIs the service speaks, each a thin layer over the shared pipeline (`llmctl.server.pipeline`).

Every handler admits its request (`Service.admit`: a `RequestContext`), parses it with its models (beside it),
builds its prompt (`prompts`), starts an `Ask` (`Service.start`) and renders the run's deltas as its own answer,
from the same models, without the service:
chat completions and legacy completions (OpenAI), Responses (OpenAI), Messages (Anthropic),
and tokenize/detokenize (vLLM's shapes).
"""
