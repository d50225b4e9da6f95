"""The shared model-loading core: model files, hardware probing, loading, memory helpers."""
