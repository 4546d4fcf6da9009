"""Llama family (Llama-2, Llama-3, SmolLM2): the standard layout, no projection biases."""

from . import Adapter, register


@register
class LlamaAdapter(Adapter):
    model_types = ("llama",)
