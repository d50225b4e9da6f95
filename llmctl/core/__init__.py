"""The shared model-loading core: model files and their checks (`modelfiles`), the embedded default
model (`embedded`), hardware probing and memory helpers (`hardware`), and loading (`loader`).

May import: llmctl.errors, llmctl.envvars. Nothing else of llmctl.
"""
