"""Inference: model loading for generation, KV-cache generation and sampling."""
