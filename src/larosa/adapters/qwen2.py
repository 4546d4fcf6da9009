"""Qwen2 / Qwen2.5: the standard layout; q/k/v carry biases, which input-side rotation leaves untouched."""

from . import Adapter, register


@register
class Qwen2Adapter(Adapter):
    model_types = ("qwen2",)
