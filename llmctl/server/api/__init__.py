"""The APIs the service speaks, each a thin layer over the shared pipeline (`llmctl.server.pipeline`).

Every module maps its request to an `Ask` and the pipeline's deltas back to its own answer:
chat completions and legacy completions (OpenAI), Responses (OpenAI), Messages (Anthropic),
and tokenize/detokenize (vLLM's shapes).
"""
