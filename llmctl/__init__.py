"""llmctl: run your own OpenAI-compatible chat LLM service, and the console tools around it."""

__version__ = "0.1.0"
