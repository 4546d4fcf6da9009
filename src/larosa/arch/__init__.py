"""Where each architecture keeps its norms, projections, dimensions, activation and rotary tables.

The rest of larosa reaches into a model only through an adapter, so a new family is one short file that names
what differs from Hugging Face's standard decoder layout and registers its ``model_type``. Adapters know no
algorithm: no sites, no sparsity, no rotations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..errors import LarosaError


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int

    @property
    def q(self) -> int:
        """Width of the query projection's output, and of the o_proj input."""
        return self.n_heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.n_kv_heads * self.head_dim


class Adapter:
    """Hugging Face's standard decoder layout; families that differ override the accessors."""

    model_types: tuple[str, ...] = ()
    hf_config: type | None = None  # the family's config and *ForCausalLM classes (the folded types derive from them)
    hf_causal_lm: type | None = None
    # Whether the residual stream can be carried in a rotated basis: not where a gained norm sits on a block's output
    # before the residual add (n(y) ⊙ γ is not rotated by rotating y).
    rotatable_residual: bool = True
    # Whether an RMSNorm multiplies by its gain in float32 before casting back (Gemma), or after the cast (Llama).
    gain_in_float32: bool = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- dimensions -------------------------------------------------------------------------------------
    @property
    def dims(self) -> Dims:
        c = self.config
        return Dims(
            hidden=c.hidden_size,
            intermediate=c.intermediate_size,
            n_layers=c.num_hidden_layers,
            n_heads=c.num_attention_heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            vocab=c.vocab_size,
        )

    def norm_eps(self) -> float:
        return self.config.rms_norm_eps

    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The MLP's gate activation: act(gate) * up feeds down_proj."""
        return ACT2FN[self.config.hidden_act]

    def sliding_window(self, i: int) -> int | None:
        """How many positions (its own included) layer ``i``'s attention sees, where the model windows it (None: all
        of them): every layer, or those ``layer_types`` marks as sliding."""
        c = self.config
        window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
        types = getattr(c, "layer_types", None)
        return window if types is None or types[i] == "sliding_attention" else None

    def attention_scale(self) -> float:
        """What the attention multiplies the query-key dot products by."""
        return self.dims.head_dim**-0.5

    def attention_extras(self) -> str | None:
        """What the attention computes beyond a causal (windowed) softmax of scaled dot products, if anything."""
        return None

    def embed_scale(self) -> float | None:
        """What the input embedding's rows are multiplied by, where the family scales them."""
        return None

    def logit_softcap(self) -> float | None:
        """The bound c of the logits' soft cap c · tanh(logits / c) (:func:`soft_cap`), where the family caps them."""
        return None

    # -- norms ------------------------------------------------------------------------------------------
    def gain(self, norm: nn.Module) -> torch.Tensor:
        """The gain an RMSNorm multiplies the normalised input by (what folding moves into the weights)."""
        return norm.weight.detach()

    def set_gain(self, norm: nn.Module, gain: torch.Tensor | float) -> None:
        """Make ``norm`` multiply by ``gain`` (1 once its gain is in the weights)."""
        norm.weight.data.copy_(torch.as_tensor(gain, dtype=norm.weight.dtype).expand_as(norm.weight))

    # -- whole-model modules ----------------------------------------------------------------------------
    def body(self) -> nn.Module:
        """The decoder stack without the LM head: embeddings, layers, final norm (and rotary tables)."""
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.body().layers

    def final_norm(self) -> nn.Module:
        return self.body().norm

    def rotary_kind(self, i: int) -> str | None:
        """Which of the model's rotary tables layer ``i`` uses, where it has several (None: its one table)."""
        return None

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype,
               kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the rotary table ``kind`` at ``positions`` ([n] -> [n, r] each: r is head_dim, or
        the share of it a partial rotary embedding rotates)."""
        probe = torch.zeros(1, dtype=dtype, device=positions.device)
        cos, sin = self.body().rotary_emb(probe, positions[None], *(() if kind is None else (kind,)))
        return cos[0], sin[0]

    # -- per-layer modules ------------------------------------------------------------------------------
    def attn_norm(self, layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    def mlp_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def attend(self, layer: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """The attention block's output for its normed input ``x`` (``kwargs``: what the model passes a layer)."""
        return self.attention(layer)(hidden_states=x, **kwargs)[0]

    def qk_norms(self, layer: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """The per-head norms of the queries and keys (after the projections, before the rotary embedding), where
        the family has them."""
        return None

    def out_norms(self, layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        """The norms of the attention and MLP blocks' outputs before the residual add, where the family has them."""
        return None, None

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def qkv(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        """The Linears that read the attention input, their outputs concatenated being q | k | v: three, or one
        where the family fuses them (Phi-3)."""
        a = self.attention(layer)
        return a.q_proj, a.k_proj, a.v_proj

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        return self.attention(layer).o_proj

    def gate_up(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        """The Linears that read the MLP input, their outputs concatenated being gate | up: two, or one fused."""
        return self.mlp(layer).gate_proj, self.mlp(layer).up_proj

    def projection(self, layer: nn.Module, name: str) -> tuple[nn.Linear, slice]:
        """Where projection ``name`` (q, k, v, gate or up) is computed: its Linear, and its rows of that Linear's
        output (``slice(None)``: all of them; a fused Linear holds several projections)."""
        d = self.dims
        attention = name in ("q", "k", "v")
        widths = {"q": d.q, "k": d.kv, "v": d.kv} if attention else {"gate": d.intermediate, "up": d.intermediate}
        linears = self.qkv(layer) if attention else self.gate_up(layer)
        names = list(widths)
        if len(linears) == len(names):
            return linears[names.index(name)], slice(None)
        (fused,) = linears
        start = sum(widths[n] for n in names[:names.index(name)])
        return fused, slice(start, start + widths[name])

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        return self.mlp(layer).down_proj


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap · tanh(x / cap), as a family with a logit soft cap bounds its logits; ``x`` itself without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


_REGISTRY: dict[str, type[Adapter]] = {}
_ALIASES: set[str] = set()  # model types registered by other layers for their own derived models (folded ones)


def register(cls: type[Adapter]) -> type[Adapter]:
    for t in cls.model_types:
        _REGISTRY[t] = cls
    return cls


def register_alias(model_type: str, cls: type[Adapter]) -> None:
    """A derived model type (such as a folded model's) read through an existing family's adapter."""
    _REGISTRY[model_type] = cls
    _ALIASES.add(model_type)


def families() -> list[type[Adapter]]:
    return list(dict.fromkeys(cls for t, cls in _REGISTRY.items() if t not in _ALIASES))


def supported() -> list[str]:
    return sorted(t for t in _REGISTRY if t not in _ALIASES)


def adapter_class(config) -> type[Adapter]:
    """Fails before any weight is loaded when the architecture is not one larosa knows."""
    model_type = getattr(config, "model_type", None)
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise LarosaError(
            f"unsupported architecture {model_type!r}; larosa supports: {', '.join(supported())}"
        )
    return cls


def adapter_for(model: nn.Module) -> Adapter:
    return adapter_class(getattr(model, "config", None))(model)


from . import gemma3, llama, mistral, phi3, qwen2, qwen3  # noqa: E402,F401  (registers the families)
