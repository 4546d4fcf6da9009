"""Gemma 3 (text): four RMSNorms a layer, two on the block inputs (``input_layernorm``, ``pre_feedforward_layernorm``:
LaRoSa's sites) and two on the block outputs before the residual add. A gained norm on a block's output leaves no
rotated residual stream (its gain would have to commute with the rotation), so Gemma 3 folds in the input form only.

Its RMSNorms scale by 1 + weight in float32: the gain is 1 + w and a unit gain is w = 0. Besides: the embedding
scaled by sqrt(hidden), GELU (tanh), per-head QK-norm, sliding-window layers between global ones, each kind with
its own rotary table, the attention scaled by ``query_pre_attn_scalar``, and optional soft caps on the logits.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.activations import ACT2FN

from . import Adapter, register


@register
class Gemma3Adapter(Adapter):
    model_types = ("gemma3_text",)
    hf_config, hf_causal_lm = Gemma3TextConfig, Gemma3ForCausalLM
    rotatable_residual = False
    gain_in_float32 = True

    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return ACT2FN[self.config.hidden_activation]

    def attention_scale(self) -> float:
        return self.config.query_pre_attn_scalar**-0.5

    def attention_extras(self) -> str | None:
        c = self.config
        if c.attn_logit_softcapping is not None:
            return f"a soft cap on the attention logits ({c.attn_logit_softcapping})"
        return "bidirectional attention" if c.use_bidirectional_attention else None

    def embed_scale(self) -> float:
        return self.body().embed_tokens.scalar_embed_scale

    def logit_softcap(self) -> float | None:
        return self.config.final_logit_softcapping

    def gain(self, norm: nn.Module) -> torch.Tensor:
        return 1.0 + norm.weight.detach().float()

    def set_gain(self, norm: nn.Module, gain: torch.Tensor | float) -> None:
        norm.weight.data.copy_((torch.as_tensor(gain, dtype=torch.float32) - 1.0).expand_as(norm.weight))

    def rotary_kind(self, i: int) -> str:
        return self.config.layer_types[i]

    def mlp_norm(self, layer: nn.Module) -> nn.Module:
        return layer.pre_feedforward_layernorm

    def out_norms(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        return layer.post_attention_layernorm, layer.post_feedforward_layernorm

    def qk_norms(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        attention = self.attention(layer)
        return attention.q_norm, attention.k_norm
