"""Qwen3: the standard layout without q/k/v biases, and an RMSNorm over each head of the queries and keys after
their projections (QK-norm). Rotating the projections' input leaves their outputs, and so these norms, unchanged."""

from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from . import Adapter, register


@register
class Qwen3Adapter(Adapter):
    model_types = ("qwen3",)
    hf_config, hf_causal_lm = Qwen3Config, Qwen3ForCausalLM

    def qk_norms(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        attention = self.attention(layer)
        return attention.q_norm, attention.k_norm
