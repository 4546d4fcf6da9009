"""Batch-1 decoding: a compact transformer with a static KV cache, dense prefill and a CUDA-graph decode step."""

from .engine import Engine, Transformer

__all__ = ["Engine", "Transformer"]
