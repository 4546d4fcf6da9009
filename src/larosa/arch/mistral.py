"""Mistral: the standard layout. Early versions window the attention (``sliding_window``); the decode engine,
which attends to every cached position, refuses a cache longer than the window."""

from transformers import MistralConfig, MistralForCausalLM

from . import Adapter, register


@register
class MistralAdapter(Adapter):
    model_types = ("mistral",)
    hf_config, hf_causal_lm = MistralConfig, MistralForCausalLM
