"""Llama family (Llama-2, Llama-3, SmolLM2): the standard layout, no projection biases."""

from transformers import LlamaConfig, LlamaForCausalLM

from ..fold import FoldedCausalLM
from . import Adapter, register


class LarosaLlamaConfig(LlamaConfig):
    model_type = "larosa_llama"


class LarosaLlamaForCausalLM(FoldedCausalLM, LlamaForCausalLM):
    config_class = LarosaLlamaConfig


@register
class LlamaAdapter(Adapter):
    model_types = ("llama",)
    folded = LarosaLlamaForCausalLM
