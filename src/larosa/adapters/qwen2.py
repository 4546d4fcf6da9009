"""Qwen2 / Qwen2.5: the standard layout; q/k/v carry biases, which input-side rotation leaves untouched."""

from transformers import Qwen2Config, Qwen2ForCausalLM

from ..fold import FoldedCausalLM
from . import Adapter, register


class LarosaQwen2Config(Qwen2Config):
    model_type = "larosa_qwen2"


class LarosaQwen2ForCausalLM(FoldedCausalLM, Qwen2ForCausalLM):
    config_class = LarosaQwen2Config


@register
class Qwen2Adapter(Adapter):
    model_types = ("qwen2",)
    folded = LarosaQwen2ForCausalLM
