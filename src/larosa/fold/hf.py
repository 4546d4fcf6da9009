"""The folded model as Hugging Face model types: for every architecture family, ``larosa_<family>`` (config and
``*ForCausalLM`` derived from the family's own), registered with the Auto classes, so that after ``import larosa``
``AutoModelForCausalLM.from_pretrained(dir)`` loads a folded directory and ``generate()`` works. A saved TEAL model
is the same type with the family's own layers and TEAL's thresholds (its settings name the method).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..arch import Adapter, adapter_for, families, register_alias
from ..errors import LarosaError
from ..io import verify_checksums
from ..sparsity import sites
from ..sparsity.levels import site_sizes
from ..sparsity.peers import restore
from ..sparsity.topk import attach
from .schema import FoldedSettings


class FoldedDecoderLayer(nn.Module):
    """A decoder layer of the family (same children, same weight names) plus the residual adapters of its scope, or
    the input transforms of the input form; its blocks are run through the family's adapter."""

    def __init__(self, layer: nn.Module, adapter: Adapter, hidden: int, mid_adapter: bool, out_adapter: bool,
                 transforms: bool):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        if hasattr(layer, "attention_type"):  # read by the model's mask building (sliding-window layers)
            self.attention_type = layer.attention_type
        self.family = adapter
        self.mid_adapter = nn.Linear(hidden, hidden, bias=False) if mid_adapter else None
        self.out_adapter = nn.Linear(hidden, hidden, bias=False) if out_adapter else None
        self.attn_transform = nn.Linear(hidden, hidden, bias=False) if transforms else None
        self.mlp_transform = nn.Linear(hidden, hidden, bias=False) if transforms else None

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        a, h = self.family, hidden_states
        attn_out, mlp_out = a.out_norms(self)
        x = a.attn_norm(self)(h)
        y = a.attend(self, x if self.attn_transform is None else self.attn_transform(x), **kwargs)
        h = h + (y if attn_out is None else attn_out(y))
        if self.mid_adapter is not None:
            h = self.mid_adapter(h)
        x = a.mlp_norm(self)(h)
        y = a.mlp(self)(x if self.mlp_transform is None else self.mlp_transform(x))
        h = h + (y if mlp_out is None else mlp_out(y))
        if self.out_adapter is not None:
            h = self.out_adapter(h)
        return h


class FoldedCausalLM:
    """Mixin for a family's ``*ForCausalLM``: builds the folded structure from ``config.larosa``.

    Loading is strict: a weight the config does not expect, or one it expects and the files lack, is an error
    (transformers would otherwise initialise it at random and go on), and weight files are checked against the
    checksums written with them.

    ``decoder`` is the faster decoding loop :mod:`larosa.runtime` puts here (a layer above, which this module
    cannot import): transformers' ``generate`` then runs it for the greedy and sampling modes, and the hooked
    model where it declines (returns None).
    """

    decoder: ClassVar[Callable | None] = None

    def __init__(self, config):
        super().__init__(config)
        settings = FoldedSettings.of(config)
        adapter = adapter_for(self)
        layers = adapter.layers()
        sizes = site_sizes(adapter.dims)
        if settings is None:  # TEAL's thresholds on the family's own layers; offsets load over these zeros
            centred = config.larosa.get("centre")
            restore(self, config.larosa, [{s: torch.zeros(n) for s, n in sizes.items()} for _ in layers]
                    if centred else None)
            return
        residual = settings.form == "residual"
        for i, layer in enumerate(layers):
            layers[i] = FoldedDecoderLayer(
                layer, adapter, config.hidden_size, mid_adapter=residual and settings.scope == "block",
                out_adapter=residual and settings.scope != "global" and i < len(layers) - 1, transforms=not residual,
            )
            # Weight-aware scores and centring offsets are saved with the weights (loaded over these placeholders).
            scales = {s: torch.ones(n) for s, n in sizes.items()} if settings.score == "weight" else None
            offsets = {s: torch.zeros(n) for s, n in sizes.items()} if settings.centre else None
            thresholds = settings.thresholds[i] if settings.thresholds is not None else None
            inputs = None if residual else (layers[i].attn_transform, layers[i].mlp_transform)
            attach(adapter, layers[i], settings.levels[i], scales=scales, thresholds=thresholds, inputs=inputs,
                   offsets=offsets)
        sites.install(self, {"method": "larosa", "mode": "folded", "levels": list(settings.levels),
                             "source": "folded", "scope": settings.scope, "score": settings.score,
                             "signal": settings.signal, "head_rotation": settings.head_rotation, "form": settings.form,
                             "select": settings.select, "thresholds": settings.thresholds,
                             "centre": settings.centre})

    def _sample(self, input_ids, *args, **kwargs):
        """transformers' greedy / sampling decoding loop (``generate`` looks it up by this name)."""
        out = None if FoldedCausalLM.decoder is None else FoldedCausalLM.decoder(self, input_ids, *args, **kwargs)
        return super()._sample(input_ids, *args, **kwargs) if out is None else out

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        if Path(path).is_dir():
            verify_checksums(Path(path))
        asked = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise LarosaError(f"{path}: weights do not match the folded config: {bad}")
        return (model, info) if asked else model


_FOLDED: dict[type[Adapter], type] = {}


def folded_class(family: type[Adapter]) -> type:
    """The folded ``*ForCausalLM`` of an architecture family, made and registered on first use."""
    cls = _FOLDED.get(family)
    if cls is not None:
        return cls
    if family.hf_config is None or family.hf_causal_lm is None:
        raise LarosaError(f"folding is not implemented for {', '.join(family.model_types)}")
    model_type = f"larosa_{family.model_types[0]}"
    config_class = type(f"Larosa{family.hf_config.__name__}", (family.hf_config,),
                        {"model_type": model_type, "__module__": __name__})
    cls = type(f"Larosa{family.hf_causal_lm.__name__}", (FoldedCausalLM, family.hf_causal_lm),
               {"config_class": config_class, "__module__": __name__})
    globals().update({config_class.__name__: config_class, cls.__name__: cls})  # importable (picklable) by name
    register_alias(model_type, family)
    AutoConfig.register(model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, cls, exist_ok=True)
    _FOLDED[family] = cls
    return cls


for _family in families():  # at import: saved folded directories of every family load with the Auto classes
    folded_class(_family)
