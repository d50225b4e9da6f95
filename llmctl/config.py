"""Compatibility alias: `llmctl.config` is now `llmctl.client.config`; existing imports keep working."""

import sys

from llmctl.client import config as _module

sys.modules[__name__] = _module
