"""Batch-1 decoding of dense and folded models: a compact transformer with a static KV cache, a CUDA-graph decode
step and the Top-K kernels, and text generation on top of it."""

from . import hf  # noqa: F401  (transformers' generate on folded models runs the engine)
from .engine import Engine, Transformer
from .generate import generate

__all__ = ["Engine", "Transformer", "generate"]
