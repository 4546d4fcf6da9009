"""Qwen2 / Qwen2.5: the standard layout; q/k/v carry biases, which input-side rotation leaves untouched."""

from transformers import Qwen2Config, Qwen2ForCausalLM

from . import Adapter, register


@register
class Qwen2Adapter(Adapter):
    model_types = ("qwen2",)
    hf_config, hf_causal_lm = Qwen2Config, Qwen2ForCausalLM
