"""Phi-3 (and Phi-4-mini, the same model type): q, k and v in one Linear (``self_attn.qkv_proj``), gate and up in
another (``mlp.gate_up_proj``; the MLP computes up * act(gate) from its two halves).

LaRoSa rotates and folds only the input side of these projections, which acts on the fused matrix's columns as
on the separate ones', so the fused layout is kept, in the folded checkpoint too. What needs one projection's
output rows (the v rows a head rotation turns, the gate half CATS thresholds) takes them from
:meth:`Adapter.projection`. Phi-4-mini rotates part of each head (``partial_rotary_factor``); the 128k variants
scale their rotary embedding by ``longrope``.
"""

import torch
from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM

from ..errors import LarosaError
from . import Adapter, register


@register
class Phi3Adapter(Adapter):
    model_types = ("phi3",)
    hf_config, hf_causal_lm = Phi3Config, Phi3ForCausalLM

    def qkv(self, layer: nn.Module) -> tuple[nn.Linear]:
        return (self.attention(layer).qkv_proj,)

    def gate_up(self, layer: nn.Module) -> tuple[nn.Linear]:
        return (self.mlp(layer).gate_up_proj,)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype,
               kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Longrope takes its short factors up to the original context and its long ones past it, chosen by
        transformers per forward call for all the positions of that call (a cache filled before the switch keeps
        short-factor keys): one table for every position matches it only while no position passes the original
        context, so a longer table is refused."""
        rope = self.config.rope_parameters
        if rope.get("rope_type") == "longrope":
            limit, asked = rope["original_max_position_embeddings"], int(positions.max()) + 1
            if asked > limit:
                raise LarosaError(f"longrope: this model switches to its long rotary factors past {limit} positions, "
                                  f"per forward call, which the engine's one table cannot follow: at most {limit} "
                                  f"positions (prompt and new tokens), not {asked}")
        return super().rotary(positions, dtype, kind)
