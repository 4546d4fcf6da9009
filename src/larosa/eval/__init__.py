"""Evaluation: perplexity over token windows (whole-model or streamed layer by layer) and zero-shot tasks through
lm-evaluation-harness."""

from .ppl import perplexity, perplexity_streamed

__all__ = ["perplexity", "perplexity_streamed"]
