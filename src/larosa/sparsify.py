"""Top-K activation sparsity in the paper-faithful ``simulate`` form.

Four sites per layer feed the seven projections. At the attention and MLP inputs the norm's output is rotated
by Q, only its k largest-magnitude entries per token are kept, and it is rotated back; the o_proj and down_proj
inputs get plain Top-K. The weights are untouched: this measures quality, not speed (the folded form and the
kernels do the speed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .adapters import Dims, adapter_for
from .errors import LarosaError
from .rotations import Rotations

SITES = ("attn_in", "o_in", "mlp_in", "down_in")
# The reference code's split of a nominal sparsity s: 0.8 s where the input is rotated, 1.2 s where it is not.
DEFAULT_SPLIT = (0.8, 1.2)


@dataclass(frozen=True)
class SparsityConfig:
    """Sparsity per site, each in [0, 1); ``nominal`` is the level it was derived from, when there is one."""

    attn_in: float
    o_in: float
    mlp_in: float
    down_in: float
    nominal: float | None = None

    def __post_init__(self) -> None:
        for site in SITES:
            s = getattr(self, site)
            if not (isinstance(s, (int, float)) and 0.0 <= s < 1.0):
                raise LarosaError(f"sparsity at {site} must be in [0, 1), got {s!r}")

    @classmethod
    def from_nominal(cls, s: float, split: tuple[float, float] = DEFAULT_SPLIT) -> "SparsityConfig":
        if not (isinstance(s, (int, float)) and 0.0 <= s < 1.0):
            raise LarosaError(f"sparsity must be in [0, 1), got {s!r}")
        rotated, plain = split[0] * s, split[1] * s
        if plain >= 1.0 or rotated >= 1.0:
            raise LarosaError(
                f"sparsity {s} with split {split} asks for {max(rotated, plain):.3f} at one site; must be < 1"
            )
        return cls(attn_in=rotated, o_in=plain, mlp_in=rotated, down_in=plain, nominal=s)

    def sites(self) -> dict[str, float]:
        return {site: getattr(self, site) for site in SITES}

    def param_weighted(self, dims: Dims) -> float:
        """Share of decoder-layer linear weight reads skipped (the same in every layer, so one layer tells)."""
        weights = dims.site_weights()
        return sum(self.sites()[s] * w for s, w in weights.items()) / sum(weights.values())

    def to_dict(self) -> dict:
        return asdict(self)


def keep_count(sparsity: float, size: int) -> int:
    """k = round((1 - s) d), at least one entry."""
    return max(1, math.floor((1.0 - sparsity) * size + 0.5))


SCORES = ("magnitude", "weight")
Sparsity = float | SparsityConfig | Sequence[SparsityConfig]


def per_layer(sparsity: Sparsity, n_layers: int) -> list[SparsityConfig]:
    """One config per layer from a nominal level, one config for all layers, or a per-layer plan."""
    if isinstance(sparsity, SparsityConfig):
        return [sparsity] * n_layers
    if isinstance(sparsity, Sequence):
        if len(sparsity) != n_layers or not all(isinstance(c, SparsityConfig) for c in sparsity):
            raise LarosaError(f"a per-layer plan needs {n_layers} SparsityConfig, got {len(sparsity)} entries")
        return list(sparsity)
    return [SparsityConfig.from_nominal(sparsity)] * n_layers


def plan_param_weighted(configs: Sequence[SparsityConfig], dims: Dims) -> float:
    """Layers are the same size, so the model's parameter-weighted sparsity is the mean of the layers'."""
    return sum(c.param_weighted(dims) for c in configs) / len(configs)


def topk(x: torch.Tensor, k: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x with all but its k top-scoring entries per row zeroed; exactly k survive even among ties.

    The score is |x|, or |x| * scale with ``scale`` the norms of the weight rows each entry multiplies: the
    entries dropped then cost the least output, not the least input.
    """
    if k >= x.shape[-1]:
        return x
    score = x.abs() if scale is None else x.abs() * scale
    idx = score.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


class TopKSite(nn.Module):
    """One site: optional rotation in, Top-K, rotation back; counts the zeros it feeds the weights.

    With ``gain``, Top-K runs on the gain-free signal: the input is divided by the norm gain before the rotation
    and multiplied back after, which is what the folded model computes.
    """

    def __init__(self, size: int, sparsity: float, rotation: torch.Tensor | None = None,
                 gain: torch.Tensor | None = None, weights: int = 0, scale: torch.Tensor | None = None):
        super().__init__()
        self.size = size
        self.k = keep_count(sparsity, size)
        self.weights = weights  # weight elements this site gates: what a zero saves in reads
        self.register_buffer("rotation", rotation, persistent=False)
        self.register_buffer("gain", gain, persistent=False)
        self.register_buffer("scale", scale)  # weight-aware scores; saved with a folded model
        self.register_buffer("zeros", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gain is not None:
            x = x / self.gain
        if self.rotation is not None:
            x = x @ self.rotation
        x = topk(x, self.k, self.scale)
        self.zeros += (x == 0).sum()
        self.seen += x.numel()
        if self.rotation is not None:
            x = x @ self.rotation.T
        if self.gain is not None:
            x = x * self.gain
        return x


def site_weight_norms(adapter, layer: nn.Module) -> dict[str, torch.Tensor]:
    """Per input entry of each site, the norm of the weight row it multiplies (q|k|v and gate|up concatenated)."""
    def norms(linears) -> torch.Tensor:
        return torch.cat([lin.weight.detach().double() for lin in linears]).norm(dim=0)

    return {"attn_in": norms(adapter.qkv(layer)), "o_in": norms([adapter.o_proj(layer)]),
            "mlp_in": norms(adapter.gate_up(layer)), "down_in": norms([adapter.down_proj(layer)])}


def _rotated_norms(adapter, layer: nn.Module, site: str, q: torch.Tensor | None, gain: torch.Tensor | None):
    """Weight-row norms in the basis Top-K sees: y = z (W diag(gain) Q)ᵀ for z = (x / gain) Q."""
    linears = {"attn_in": adapter.qkv(layer), "mlp_in": adapter.gate_up(layer)}[site]
    w = torch.cat([lin.weight.detach().double() for lin in linears])
    if gain is not None:
        w = w * gain.double()
    return (w @ q.double()).norm(dim=0) if q is not None else w.norm(dim=0)


def attach_sites(adapter, layer: nn.Module, config: SparsityConfig, rotations=(None, None), gains=(None, None),
                 scales: dict[str, torch.Tensor] | None = None):
    """Hook the four Top-K sites into one decoder layer; returns the hook handles."""
    dims = adapter.dims
    w = dims.site_weights()
    scales = scales or {}
    sites = {
        "attn_in": TopKSite(dims.hidden, config.attn_in, rotations[0], gains[0], w["attn_in"], scales.get("attn_in")),
        "o_in": TopKSite(dims.n_heads * dims.head_dim, config.o_in, weights=w["o_in"], scale=scales.get("o_in")),
        "mlp_in": TopKSite(dims.hidden, config.mlp_in, rotations[1], gains[1], w["mlp_in"], scales.get("mlp_in")),
        "down_in": TopKSite(dims.intermediate, config.down_in, weights=w["down_in"], scale=scales.get("down_in")),
    }
    layer.larosa_sites = nn.ModuleDict(sites).to(adapter.o_proj(layer).weight.device)
    return [
        adapter.attn_norm(layer).register_forward_hook(lambda m, a, out: sites["attn_in"](out)),
        adapter.o_proj(layer).register_forward_pre_hook(lambda m, a: (sites["o_in"](a[0]), *a[1:])),
        adapter.mlp_norm(layer).register_forward_hook(lambda m, a, out: sites["mlp_in"](out)),
        adapter.down_proj(layer).register_forward_pre_hook(lambda m, a: (sites["down_in"](a[0]), *a[1:])),
    ]


def site_inputs(adapter, layer: nn.Module, rotations: Rotations | None, qs: tuple | None, score: str):
    """(rotations, gains, weight-aware scales) of one layer's sites, on the layer's device and dtype."""
    w = adapter.o_proj(layer).weight
    rot, gains = (None, None), (None, None)
    if rotations is not None:
        rot = tuple(q.to(w.device, w.dtype) for q in qs)
        if rotations.signal == "gainfree":
            gains = (adapter.attn_norm(layer).weight.detach(), adapter.mlp_norm(layer).weight.detach())
    if score != "weight":
        return rot, gains, None
    scales = site_weight_norms(adapter, layer)
    for site, q, gain in (("attn_in", rot[0], gains[0]), ("mlp_in", rot[1], gains[1])):
        scales[site] = _rotated_norms(adapter, layer, site, q, gain)
    return rot, gains, {k: v.to(w.device, w.dtype) for k, v in scales.items()}


def sparsify(
    model: nn.Module,
    rotations: Rotations | None,
    sparsity: Sparsity = 0.4,
    *,
    scope: str = "block",
    score: str = "magnitude",
) -> nn.Module:
    """Make ``model`` sparse in place (simulate form) and return it; a second call replaces the first.

    ``sparsity`` is a nominal level, one :class:`SparsityConfig`, or a per-layer plan (a list of them, as
    :mod:`larosa.search` makes). ``scope`` picks the rotation of each block input (see
    :meth:`Rotations.for_scope`); Top-K runs on the signal the rotations were calibrated on. ``rotations=None``
    gives plain, unrotated Top-K. ``score="weight"`` ranks entries by |x_i| ||W_i||.
    """
    configs, attach = layer_sites(model, rotations, sparsity, scope=scope, score=score)
    unsparsify(model)
    handles = []
    for i, layer in enumerate(adapter_for(model).layers()):
        handles += attach(i, layer)
    model.larosa = {"handles": handles, "sparsity": configs, "scope": scope,
                    "rotated": rotations is not None, "score": score}
    return model


def layer_sites(model: nn.Module, rotations: Rotations | None, sparsity: Sparsity, *, scope: str = "block",
                score: str = "magnitude") -> tuple[list[SparsityConfig], Callable[[int, nn.Module], list]]:
    """(per-layer configs, ``attach``): ``attach(i, layer)`` hooks layer i's sites and returns the handles. What
    :func:`sparsify` does to every layer, usable one layer at a time while its weights are resident
    (:func:`larosa.evaluate.perplexity_streamed`)."""
    adapter = adapter_for(model)
    _refuse_folded(model)
    if score not in SCORES:
        raise LarosaError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    configs = per_layer(sparsity, adapter.dims.n_layers)
    qs = None
    if rotations is not None:
        rotations.check_model(model)
        qs = rotations.for_scope(scope)

    def attach(i: int, layer: nn.Module) -> list:
        inputs = site_inputs(adapter, layer, rotations, qs[i] if qs is not None else None, score)
        return attach_sites(adapter, layer, configs[i], *inputs)

    return configs, attach


def _refuse_folded(model: nn.Module) -> None:
    if model.config.model_type.startswith("larosa_"):
        raise LarosaError("this model is folded and carries its own sparsity; simulate on the dense model")


def unsparsify(model: nn.Module) -> nn.Module:
    """Remove what :func:`sparsify` added; the model is dense again."""
    _refuse_folded(model)
    state = model.__dict__.pop("larosa", None)
    if state is not None:
        for h in state["handles"]:
            h.remove()
    for layer in adapter_for(model).layers():
        if "larosa_sites" in layer._modules:
            del layer._modules["larosa_sites"]
    return model


def _attached(model: nn.Module) -> list[nn.ModuleDict]:
    return [layer._modules["larosa_sites"] for layer in adapter_for(model).layers() if "larosa_sites" in layer._modules]


def sparsity_by_site(layers: list[nn.ModuleDict]) -> dict[str, float]:
    """Measured share of zeros fed to each site's weights, over the given layers' sites."""
    zeros: dict[str, float] = {}
    seen: dict[str, float] = {}
    for sites in layers:
        for name, site in sites.items():
            zeros[name] = zeros.get(name, 0.0) + site.zeros.item()
            seen[name] = seen.get(name, 0.0) + site.seen.item()
    return {s: zeros[s] / seen[s] for s in seen if seen[s]}


def param_weighted_share(layers: list[nn.ModuleDict], dims: Dims) -> float:
    """Measured share of the decoder's linear weight reads that the given layers' sites skipped.

    Every site module counts ``zeros`` and ``seen`` and knows the ``weights`` it gates, so Top-K, threshold and
    gate-activation methods are compared on the same footing.
    """
    skipped = sum(site.zeros.item() / site.seen.item() * site.weights
                  for sites in layers for site in sites.values() if site.seen.item())
    return skipped / (sum(dims.site_weights().values()) * dims.n_layers)


def site_sparsity(model: nn.Module, reset: bool = False) -> dict[str, float]:
    """Measured share of zeros fed to each site's weights, over all layers and tokens since the last reset."""
    layers = _attached(model)
    measured = sparsity_by_site(layers)
    if reset:
        for site in (site for sites in layers for site in sites.values()):
            site.zeros.zero_()
            site.seen.zero_()
    return measured


def measured_param_weighted(model: nn.Module) -> float:
    """Measured share of decoder linear weight reads skipped since the last reset, for any method's sites."""
    return param_weighted_share(_attached(model), adapter_for(model).dims)
