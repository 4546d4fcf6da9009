"""Mistral: the standard layout. Early versions window the attention (``sliding_window``): transformers' modules
and the decode engine attend to the window's last positions only."""

from transformers import MistralConfig, MistralForCausalLM

from . import Adapter, register


@register
class MistralAdapter(Adapter):
    model_types = ("mistral",)
    hf_config, hf_causal_lm = MistralConfig, MistralForCausalLM
