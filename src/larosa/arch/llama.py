"""Llama family (Llama-2, Llama-3, SmolLM2): the standard layout, no projection biases."""

from transformers import LlamaConfig, LlamaForCausalLM

from . import Adapter, register


@register
class LlamaAdapter(Adapter):
    model_types = ("llama",)
    hf_config, hf_causal_lm = LlamaConfig, LlamaForCausalLM
