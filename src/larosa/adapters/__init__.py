"""Where each architecture keeps its norms, projections and dimensions.

Everything else in larosa reaches into a model only through an adapter, so a new family (Mistral, Qwen3)
is one short file that names its module paths and registers its ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
    def kv(self) -> int:
        return self.n_kv_heads * self.head_dim

    def site_weights(self) -> dict[str, int]:
        """Weights each sparsity site feeds in one layer (see docs: sparsity accounting)."""
        d, i = self.hidden, self.intermediate
        return {
            "attn_in": d * (self.n_heads * self.head_dim + 2 * self.kv),
            "o_in": self.n_heads * self.head_dim * d,
            "mlp_in": 2 * d * i,
            "down_in": i * d,
        }

    def adapter_overhead(self, scope: str) -> float:
        """Residual-adapter weights of a folded layer (d x d each, read densely) over the layer's linear weights."""
        adapters = {"global": 0, "layer": 1, "block": 2}[scope]
        return adapters * self.hidden**2 / sum(self.site_weights().values())


class Adapter:
    """Hugging Face's standard decoder layout; families that differ override the accessors."""

    model_types: tuple[str, ...] = ()
    folded: type | None = None  # the family's registered folded *ForCausalLM, if it has one

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

    # -- whole-model modules ----------------------------------------------------------------------------
    def body(self) -> nn.Module:
        """The decoder stack without the LM head: embeddings, layers, final norm (and rotary tables)."""
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.body().layers

    def final_norm(self) -> nn.Module:
        return self.body().norm

    # -- per-layer modules ------------------------------------------------------------------------------
    def attn_norm(self, layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    def mlp_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def qkv(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        a = layer.self_attn
        return a.q_proj, a.k_proj, a.v_proj

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        return layer.self_attn.o_proj

    def gate_up(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        return layer.mlp.gate_proj, layer.mlp.up_proj

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.down_proj


_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Register a family; its folded model type, if any, is registered with transformers' Auto classes too."""
    for t in cls.model_types:
        _REGISTRY[t] = cls
    if cls.folded is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        config_class = cls.folded.config_class
        _REGISTRY[config_class.model_type] = cls
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, cls.folded, exist_ok=True)
    return cls


def supported() -> list[str]:
    return sorted(t for t in _REGISTRY if not t.startswith("larosa_"))


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


from . import llama, qwen2  # noqa: E402,F401  (registers the families)
