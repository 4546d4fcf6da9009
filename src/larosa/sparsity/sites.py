"""The site protocol, owned here and nowhere else: every method's sparsity lives in site modules hooked into the
decoder layers, and every site counts the zeros it feeds the weights it gates.

A layer's sites sit in ``layer.larosa_sites`` (an ``nn.ModuleDict``, so they follow the model's device and a
folded model saves their buffers) with the hooks that run them; what a method was applied with sits in
``model.larosa``. :func:`attach` / :func:`detach` work on one layer (the layer-by-layer passes attach while a
layer is resident), :func:`install` / :func:`remove` on the whole model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..arch import Dims, adapter_for
from ..errors import LarosaError
from .levels import site_weights

ATTR = "larosa_sites"
_HANDLES = "_larosa_hooks"


class Site(nn.Module):
    """A sparsity site: ``forward`` returns its input with entries zeroed; :meth:`count` tallies them."""

    def __init__(self, weights: int):
        super().__init__()
        self.weights = weights  # weight elements this site gates: what a zero saves in reads
        self.register_buffer("zeros", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long), persistent=False)

    def count(self, x: torch.Tensor) -> torch.Tensor:
        self.zeros += (x == 0).sum()
        self.seen += x.numel()
        return x


# Where a site runs: on a module's input (before it) or on its output (after it).
Hook = tuple[nn.Module, str, Site]


def attach(layer: nn.Module, sites: dict[str, Site], hooks: Sequence[Hook]) -> nn.ModuleDict:
    """Install ``sites`` on ``layer`` (moved to its device) and hook each where ``hooks`` say; replaces any."""
    detach(layer)
    device = next(layer.parameters()).device
    layer.larosa_sites = nn.ModuleDict(sites)
    if device.type != "meta":
        layer.larosa_sites.to(device)
    handles = []
    for module, where, site in hooks:
        if where == "input":
            handles.append(module.register_forward_pre_hook(lambda m, args, s=site: (s(args[0]), *args[1:])))
        elif where == "output":
            handles.append(module.register_forward_hook(lambda m, args, out, s=site: s(out)))
        else:
            raise ValueError(f"a site runs on a module's input or output, not {where!r}")
    layer.__dict__[_HANDLES] = handles
    return layer.larosa_sites


def detach(layer: nn.Module) -> nn.ModuleDict | None:
    """Remove ``layer``'s sites and their hooks; returns the sites (their counters survive)."""
    for handle in layer.__dict__.pop(_HANDLES, ()):
        handle.remove()
    return layer._modules.pop(ATTR, None)


def of(layer: nn.Module) -> nn.ModuleDict | None:
    return layer._modules.get(ATTR)


@contextmanager
def attached(layer: nn.Module, sites: dict[str, Site], hooks: Sequence[Hook]) -> Iterator[nn.ModuleDict]:
    """Sites on ``layer`` for the block only (the trials of a greedy search)."""
    try:
        yield attach(layer, sites, hooks)
    finally:
        detach(layer)


def install(model: nn.Module, settings: dict) -> None:
    """Record what the sites of ``model``'s layers were made from (method, levels, scope...)."""
    model.__dict__["larosa"] = settings


def settings(model: nn.Module) -> dict | None:
    return model.__dict__.get("larosa")


def remove(model: nn.Module) -> nn.Module:
    """Every site off ``model``: it is dense again. A folded model's sparsity is in its weights, so it is refused."""
    if (settings(model) or {}).get("mode") == "folded":
        raise LarosaError("this model is folded and carries its own sparsity; load the dense model instead")
    model.__dict__.pop("larosa", None)
    for layer in adapter_for(model).layers():
        detach(layer)
    return model


def refuse_folded(model: nn.Module) -> None:
    """Simulated methods hook into the dense model's projections; a folded model has other weights."""
    if (settings(model) or {}).get("mode") == "folded":
        raise LarosaError("this model is folded and carries its own sparsity; simulate on the dense model")


def layers_of(model: nn.Module) -> list[nn.ModuleDict]:
    return [sites for layer in adapter_for(model).layers() if (sites := of(layer)) is not None]


def by_site(layers: Sequence[nn.ModuleDict]) -> dict[str, float]:
    """Measured share of zeros fed to each site's weights, over the given layers' sites."""
    zeros: dict[str, float] = {}
    seen: dict[str, float] = {}
    for sites in layers:
        for name, site in sites.items():
            zeros[name] = zeros.get(name, 0.0) + site.zeros.item()
            seen[name] = seen.get(name, 0.0) + site.seen.item()
    return {s: zeros[s] / seen[s] for s in seen if seen[s]}


def param_weighted_share(layers: Sequence[nn.ModuleDict], dims: Dims) -> float:
    """Measured share of the decoder's linear weight reads that the given layers' sites skipped: every method's
    sites count zeros and know the weights they gate, so Top-K, thresholds and gate activations compare alike."""
    skipped = sum(site.zeros.item() / site.seen.item() * site.weights
                  for sites in layers for site in sites.values() if site.seen.item())
    return skipped / (sum(site_weights(dims).values()) * dims.n_layers)


def site_sparsity(model: nn.Module, reset: bool = False) -> dict[str, float]:
    """Measured share of zeros fed to each site's weights, over all layers and tokens since the last reset."""
    layers = layers_of(model)
    measured = by_site(layers)
    if reset:
        for site in (site for sites in layers for site in sites.values()):
            site.zeros.zero_()
            site.seen.zero_()
    return measured


def measured_param_weighted(model: nn.Module) -> float:
    """Measured share of decoder linear weight reads skipped since the last reset, for any method's sites."""
    return param_weighted_share(layers_of(model), adapter_for(model).dims)
