"""Compatibility alias: `llmctl.probe` is now `llmctl.client.probe`; existing imports keep working."""

import sys

from llmctl.client import probe as _module

sys.modules[__name__] = _module
