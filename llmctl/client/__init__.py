"""The client side: settings (YAML `llm:` section and env vars), the chat client with retries and
fallback from the self-hosted service to Together AI and OpenAI, provider endpoints, probes of a
running server (/health, /metrics), and the interactive chat loop.

May import: llmctl.errors, llmctl.envvars, llmctl.keyfile. Never torch, transformers or the server:
`llmctl chat`, `health` and `metrics` must start fast on machines without the model stack.
"""

from llmctl.client.client import ChatResult, ChatStream, Client, batch_chat
from llmctl.client.config import LLMSettings, load_settings
from llmctl.client.providers import AllProvidersFailed, ClientError, ProviderError, provider_chain

__all__ = ["AllProvidersFailed", "ChatResult", "ChatStream", "Client", "ClientError", "LLMSettings", "ProviderError",
           "batch_chat", "load_settings", "provider_chain"]
