"""LaRoSa's Top-K sites, and the method's one config.

Four sites per layer feed the seven projections. At the attention and MLP inputs the norm's output is rotated by
Q, only its k largest-magnitude entries per token are kept, and it is rotated back; the o_proj and down_proj
inputs get plain Top-K. :func:`simulate` hooks this into the dense model (the paper-faithful ``simulate`` mode:
quality, not speed); the folded model (:mod:`larosa.fold`) runs the same sites on weights that absorbed Q.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import Adapter, adapter_for
from ..errors import LarosaError
from ..rotations import SCOPES, Rotations
from ..streaming import CENTRE_TOKENS, CENTRES, QuantileSample, RowSample, advance, centre_of, passes, quantile
from . import sites as site_protocol
from .levels import (DEFAULT_SPLIT, FORMS, SCORES, Sparsity, SparsityConfig, check_target, default_config,
                     keep_count, per_layer, site_sizes, site_weights)
from .plan import Plan

MODES = ("simulate", "folded")
# The scope each mode uses unless told otherwise: the best quality measured in each (README, results).
DEFAULT_SCOPE = {"simulate": "block", "folded": "global"}
# How a site picks what it keeps: exactly its k largest entries per token, or every entry at or above a threshold
# calibrated to drop the site's share of the calibration entries (k then varies per token, as in TEAL); greedy:
# a threshold per projection, allocated by TEAL's greedy search, on the globally rotated model.
SELECTS = ("topk", "threshold", "greedy")
Thresholds = Sequence[dict[str, float]]  # one {site: threshold} per layer


@dataclass(frozen=True)
class LaRoSaConfig:
    """How to apply LaRoSa: give exactly one of ``sparsity`` (a nominal level s, split ``split`` between rotated
    and plain sites, or per-site levels), ``target`` (parameter-weighted, reached with ``split``) or ``plan``
    (searched per-layer levels, see :func:`larosa.search.search`).

    ``rotations`` None means plain, unrotated Top-K (simulate only). ``scope`` picks which Q rotates each block
    input (:meth:`Rotations.for_scope`); left None it is the plan's, else ``DEFAULT_SCOPE[mode]``. ``score``
    likewise: the plan's, else ``"magnitude"`` (``"weight"`` ranks |x_i| by the norm of the weight row it
    multiplies). ``mode="folded"`` builds the deployable model; ``head_rotation`` rotates its o_proj input per
    KV head; ``form`` is how it carries the rotations: ``"residual"`` rotates the residual stream (d x d adapters
    where the basis changes: none in global scope), ``"input"`` transforms each block's normed input by a d x d
    matrix (two a layer, any scope, and the gain-included signal exactly as simulated).
    ``select="threshold"`` keeps every entry at or above a per-site, per-layer threshold instead of
    exactly k (no selection on the decode path): ``thresholds`` as calibrated before, or calibrated on apply
    from ``calib`` ([n, seq_len] token ids) in the basis each site sees. ``centre`` ("mean" or "median") centres
    every site's input on a per-coordinate offset calibrated on ``calib`` before it selects.
    ``select="greedy"`` (``sparsify``'s default, the most accurate at equal bytes read, issue 14) turns the model
    into the basis of the global Q (the folded global form at sparsity 0: no adapters) and puts a threshold on each
    projection's input, allocated for ``target`` by TEAL's greedy search on ``calib``, centred (``centre``, default
    the median) and weight-aware (``score``, default ``"weight"``): a :class:`~larosa.TealConfig` with rotations.
    """

    rotations: Rotations | None = None
    sparsity: Sparsity | None = None
    target: float | None = None
    plan: Plan | None = None
    split: tuple[float, float] = DEFAULT_SPLIT
    scope: str | None = None
    score: str | None = None
    mode: str = "simulate"
    head_rotation: bool = False
    form: str | None = None
    select: str = "topk"
    calib: torch.Tensor | None = None
    thresholds: Thresholds | None = None
    centre: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("sparsity", "target", "plan") if getattr(self, name) is not None]
        if not given:
            raise LarosaError("LaRoSa needs a sparsity (--sparsity / --site), a parameter-weighted target (--target) "
                              "or a searched plan (--plan)")
        if len(given) > 1:
            raise LarosaError(f"{' and '.join(given)} given: LaRoSa takes one of sparsity, target and plan, not both")
        if self.mode not in MODES:
            raise LarosaError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.scope is not None and self.scope not in SCOPES:
            raise LarosaError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.score is not None and self.score not in SCORES:
            raise LarosaError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.mode == "folded" and self.rotations is None:
            raise LarosaError("folded mode needs rotations (--rotations)")
        if self.head_rotation and self.mode != "folded":
            raise LarosaError("head rotation applies to folded mode only (--mode folded)")
        if self.form is not None and self.form not in FORMS:
            raise LarosaError(f"form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.form == "input" and self.mode != "folded":
            raise LarosaError("the folded form applies to folded mode only (--mode folded)")
        if self.mode == "folded" and self.form == "residual" and self.rotations.objective != "pca":
            raise LarosaError("rotations of the weighted objective transform the input by diag(n) Q, which is not "
                              "orthogonal: fold them in the input form (--form input)")
        if self.select not in SELECTS:
            raise LarosaError(f"select must be one of {', '.join(SELECTS)}, got {self.select!r}")
        if self.centre is not None and self.centre not in CENTRES:
            raise LarosaError(f"centre must be one of {', '.join(CENTRES)}, got {self.centre!r}")
        if self.select != "topk" and self.thresholds is None and self.calib is None:
            raise LarosaError(f"{self.select} selection needs calibration windows to set its thresholds on "
                              "(--calib-data)")
        if self.select == "greedy":
            self._check_greedy()
        if self.centre and self.calib is None:
            raise LarosaError("centring needs calibration windows to set its offsets on (--calib-data)")
        if self.select == "topk" and self.thresholds is not None:
            raise LarosaError("thresholds are for threshold selection (--select threshold)")
        if self.calib is not None and self.select == "topk" and not self.centre:
            raise LarosaError("calibration windows are for threshold selection or centring (--select threshold, "
                              "--centre)")
        if self.target is not None:
            check_target(self.target)
        if self.plan is not None:
            for name in ("scope", "score"):
                mine, planned = getattr(self, name), getattr(self.plan, name)
                if mine is not None and mine != planned:
                    raise LarosaError(f"the plan was searched for {name} {planned!r}, not {mine!r}; search for "
                                      f"{mine!r} or leave {name} to the plan")
            if self.rotations is not None and self.plan.signal != self.rotations.signal:
                warnings.warn(f"the plan was searched on {self.plan.signal}-signal rotations, these are "
                              f"{self.rotations.signal}-signal", stacklevel=3)

    def _check_greedy(self) -> None:
        """Greedy thresholds sit on the plain, globally rotated model: a parameter-weighted target, nothing of
        Top-K's levels, scopes or forms."""
        if self.rotations is None:
            raise LarosaError("greedy selection puts thresholds on the model in the basis of the global Q: give "
                              "rotations (--rotations)")
        if self.target is None:
            raise LarosaError("greedy selection allocates a parameter-weighted target (--target), not a nominal "
                              "sparsity or a plan (those are Top-K's: --select topk)")
        fixed = {"scope": (self.scope, "global"), "form": (self.form, "residual")}
        for name, (given, only) in fixed.items():
            if given not in (None, only):
                raise LarosaError(f"greedy selection runs on the {only} {name} only, not {given!r}")
        if self.head_rotation or self.thresholds is not None:
            raise LarosaError("greedy selection calibrates its own thresholds and takes no head rotation")

    @property
    def resolved_scope(self) -> str:
        return self.scope or (self.plan.scope if self.plan else DEFAULT_SCOPE[self.mode])

    @property
    def resolved_score(self) -> str:
        return self.score or (self.plan.score if self.plan else "magnitude")

    @property
    def source(self) -> str:
        """Where the levels come from: a nominal level or per-site levels, a target's split, a searched plan."""
        return "searched" if self.plan else "split" if self.target is not None else "nominal"

    def levels(self, dims) -> list[SparsityConfig]:
        """One SparsityConfig per layer."""
        if self.plan is not None:
            return per_layer(list(self.plan.levels), dims.n_layers)
        if self.target is not None:
            return per_layer(default_config(dims, self.target, self.split), dims.n_layers)
        sparsity = self.sparsity
        if isinstance(sparsity, (int, float)):
            sparsity = SparsityConfig.from_nominal(sparsity, self.split)
        return per_layer(sparsity, dims.n_layers)

    def check_model(self, model: nn.Module) -> None:
        if self.rotations is not None:
            self.rotations.check_model(model)
        if self.plan is not None:
            self.plan.check_model(model)
        n_layers = adapter_for(model).dims.n_layers
        if self.thresholds is not None and len(self.thresholds) != n_layers:
            raise LarosaError(f"{len(self.thresholds)} layers of thresholds given for a model of {n_layers} layers")


def score(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """What a site ranks: |x|, or |x| * scale with ``scale`` the norms of the weight rows each entry multiplies
    (the entries dropped then cost the least output, not the least input)."""
    return x.abs() if scale is None else x.abs() * scale


def keep_top(x: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """x with all but its k top-scoring entries per row zeroed; exactly k survive even among ties."""
    if k >= x.shape[-1]:
        return x
    idx = scores.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


def topk(x: torch.Tensor, k: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x with all but its k top-scoring entries per row zeroed (see :func:`score`)."""
    return keep_top(x, score(x, scale), k)


class TopKSite(site_protocol.Site):
    """One site: optional rotation in, Top-K (or a threshold), rotation back.

    With ``gain``, Top-K runs on the gain-free signal: the input is divided by the norm gain before the rotation
    and multiplied back after, which is what the folded model computes (where a gain is exactly 0, as in real
    Gemma 3 270M's norms, the entry is ranked as 0, as calibration and the input form take it; the residual
    form, whose norm sees a rotated stream, ranks its true value; the output ignores it either way). With
    ``threshold``, every entry whose score is at or above it is kept instead of exactly k. While ``sample`` is set,
    the scores are sampled (the calibration of thresholds).
    """

    def __init__(self, size: int, sparsity: float, rotation: torch.Tensor | None = None,
                 gain: torch.Tensor | None = None, weights: int = 0, scale: torch.Tensor | None = None,
                 threshold: float | None = None, offset: torch.Tensor | None = None,
                 norms: torch.Tensor | None = None):
        super().__init__(weights)
        self.size, self.level = size, sparsity
        self.k = keep_count(sparsity, size)
        self.threshold = threshold
        self.sample: QuantileSample | None = None  # set while thresholds are calibrated
        self.rows: RowSample | None = None  # set while offsets are calibrated
        self.register_buffer("rotation", rotation, persistent=False)
        self.register_buffer("gain", gain, persistent=False)
        self.zero_gain = gain is not None and bool((gain == 0).any())
        self.register_buffer("norms", norms, persistent=False)  # a weighted objective's scaling before the rotation
        self.register_buffer("scale", scale)  # weight-aware scores; saved with a folded model
        self.register_buffer("offset", offset)  # centring; saved with a folded model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gain is not None:
            x = torch.where(self.gain != 0, x / self.gain, 0.0) if self.zero_gain else x / self.gain
        if self.norms is not None:
            x = x * self.norms
        if self.rotation is not None:
            x = x @ self.rotation
        if self.rows is not None:
            self.rows.add(x)
        if self.offset is not None:
            x = x - self.offset
        scores = score(x, self.scale)
        if self.sample is not None:
            self.sample.add(scores)
        x = self.count(keep_top(x, scores, self.k) if self.threshold is None
                       else x.masked_fill(scores < self.threshold, 0))
        if self.offset is not None:
            x = x + self.offset
        if self.rotation is not None:
            x = x @ self.rotation.T
        if self.norms is not None:
            x = x / self.norms
        if self.gain is not None:
            x = x * self.gain
        return x


def weight_norms(adapter: Adapter, layer: nn.Module) -> dict[str, torch.Tensor]:
    """Per input entry of each site, the norm of the weight row it multiplies (q|k|v and gate|up concatenated)."""
    def norms(linears) -> torch.Tensor:
        return torch.cat([lin.weight.detach().double() for lin in linears]).norm(dim=0)

    return {"attn_in": norms(adapter.qkv(layer)), "o_in": norms([adapter.o_proj(layer)]),
            "mlp_in": norms(adapter.gate_up(layer)), "down_in": norms([adapter.down_proj(layer)])}


def _rotated_norms(adapter: Adapter, layer: nn.Module, site: str, q: torch.Tensor | None, gain: torch.Tensor | None,
                   norms: torch.Tensor | None):
    """Weight-row norms in the basis Top-K sees: y = z (W diag(gain / n) Q)ᵀ for z = (x / gain) diag(n) Q."""
    linears = {"attn_in": adapter.qkv(layer), "mlp_in": adapter.gate_up(layer)}[site]
    w = torch.cat([lin.weight.detach().double() for lin in linears])
    if gain is not None:
        w = w * gain.double()
    if norms is not None:
        w = w / norms.double()
    return (w @ q.double()).norm(dim=0) if q is not None else w.norm(dim=0)


def attach(adapter: Adapter, layer: nn.Module, levels: SparsityConfig, rotations=(None, None), gains=(None, None),
           scales: dict[str, torch.Tensor] | None = None, thresholds: dict[str, float] | None = None,
           inputs: tuple[nn.Module, nn.Module] | None = None,
           offsets: dict[str, torch.Tensor] | None = None, norms=(None, None)) -> nn.ModuleDict:
    """The four Top-K sites on one decoder layer, where the layer's own modules read each site's input: the block
    inputs' sites on the output of the norms, or of ``inputs`` (a folded model's input transforms)."""
    dims = adapter.dims
    size, w, scales, t, o = site_sizes(dims), site_weights(dims), scales or {}, thresholds or {}, offsets or {}
    made = {
        "attn_in": TopKSite(size["attn_in"], levels.attn_in, rotations[0], gains[0], w["attn_in"],
                            scales.get("attn_in"), t.get("attn_in"), o.get("attn_in"), norms[0]),
        "o_in": TopKSite(size["o_in"], levels.o_in, weights=w["o_in"], scale=scales.get("o_in"),
                         threshold=t.get("o_in"), offset=o.get("o_in")),
        "mlp_in": TopKSite(size["mlp_in"], levels.mlp_in, rotations[1], gains[1], w["mlp_in"], scales.get("mlp_in"),
                           t.get("mlp_in"), o.get("mlp_in"), norms[1]),
        "down_in": TopKSite(size["down_in"], levels.down_in, weights=w["down_in"], scale=scales.get("down_in"),
                            threshold=t.get("down_in"), offset=o.get("down_in")),
    }
    attn_in, mlp_in = inputs or (adapter.attn_norm(layer), adapter.mlp_norm(layer))
    return site_protocol.attach(layer, made, [
        (attn_in, "output", made["attn_in"]),
        (adapter.o_proj(layer), "input", made["o_in"]),
        (mlp_in, "output", made["mlp_in"]),
        (adapter.down_proj(layer), "input", made["down_in"]),
    ])


def _site_inputs(adapter: Adapter, layer: nn.Module, rotations: Rotations | None, qs: tuple | None,
                 ns: tuple | None, score: str) -> dict:
    """The rotations, gains, weighted-objective norms and weight-aware scales of one layer's sites, on the layer's
    device and dtype (as :func:`attach` takes them)."""
    w = adapter.o_proj(layer).weight
    rot, gains, norms = (None, None), (None, None), (None, None)
    if rotations is not None:
        rot = tuple(q.to(w.device, w.dtype) for q in qs)
        if rotations.signal == "gainfree":
            gains = tuple(adapter.gain(n).to(w.dtype) for n in (adapter.attn_norm(layer), adapter.mlp_norm(layer)))
        if ns is not None:
            norms = tuple(n.to(w.device, w.dtype) for n in ns)
    inputs = {"rotations": rot, "gains": gains, "norms": norms}
    if score != "weight":
        return inputs
    scales = weight_norms(adapter, layer)
    for site, q, gain, n in (("attn_in", rot[0], gains[0], norms[0]), ("mlp_in", rot[1], gains[1], norms[1])):
        scales[site] = _rotated_norms(adapter, layer, site, q, gain, n)
    return {**inputs, "scales": {k: v.to(w.device, w.dtype) for k, v in scales.items()}}


def prepare(model: nn.Module, config: LaRoSaConfig) -> tuple[list[SparsityConfig], Callable[[int, nn.Module], object]]:
    """(per-layer levels, ``attach(i, layer)``): what :func:`simulate` does to every layer, usable one layer at a
    time while its weights are resident (streamed perplexity, the search)."""
    if config.mode != "simulate":
        raise LarosaError("this path simulates LaRoSa on the dense model; folded mode builds a new model "
                          "(larosa.sparsify)")
    site_protocol.refuse_folded(model)
    config.check_model(model)
    adapter = adapter_for(model)
    levels = config.levels(adapter.dims)
    rotations, scope = config.rotations, config.resolved_scope
    qs = rotations.for_scope(scope) if rotations is not None else None
    ns = rotations.norms_for_scope(scope) if rotations is not None else None

    def attach_layer(i: int, layer: nn.Module) -> nn.ModuleDict:
        inputs = _site_inputs(adapter, layer, rotations, qs[i] if qs else None, ns[i] if ns else None,
                              config.resolved_score)
        return attach(adapter, layer, levels[i], **inputs,
                      thresholds=config.thresholds[i] if config.thresholds is not None else None)

    return levels, attach_layer


def settings(config: LaRoSaConfig, levels: list[SparsityConfig]) -> dict:
    """What a LaRoSa model records of how it was made (``model.larosa``)."""
    rotations = config.rotations
    return {"method": "larosa", "mode": config.mode, "levels": levels, "source": config.source,
            "scope": config.resolved_scope if rotations is not None else None,
            "score": config.resolved_score, "signal": rotations.signal if rotations is not None else None,
            "head_rotation": config.head_rotation, "form": config.form, "select": config.select,
            "centre": config.centre,
            "thresholds": None if config.thresholds is None else [dict(t) for t in config.thresholds]}


def simulate(model: nn.Module, config: LaRoSaConfig) -> nn.Module:
    """Make ``model`` sparse in place (simulate form) and return it; any method applied before is removed."""
    levels, attach_layer = prepare(model, config)
    site_protocol.remove(model)
    for i, layer in enumerate(adapter_for(model).layers()):
        attach_layer(i, layer)
    site_protocol.install(model, settings(config, levels))
    return model


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, windows: torch.Tensor, *, device: str | None = None,
                         progress: bool = True) -> list[dict[str, float]]:
    """Per layer and site of a model carrying LaRoSa's sites (simulated or folded), the threshold under which the
    site's configured share of the calibration entries lies, measured on what the site ranks (its rotated score)
    with exact Top-K in the layers before it; layer by layer, so the model may be larger than the device."""
    generator = torch.Generator().manual_seed(0)
    thresholds = []
    for _, layer, call, hidden in passes(model, windows, "thresholds", device, progress):
        made = site_protocol.of(layer)
        if made is None or not all(isinstance(site, TopKSite) for site in made.values()):
            raise LarosaError("thresholds are calibrated on a model carrying LaRoSa's Top-K sites")
        for site in made.values():
            site.sample = QuantileSample(len(windows), generator)
        try:
            advance(layer, call, hidden)
            thresholds.append({name: quantile(site.sample.sorted(), site.level) for name, site in made.items()})
        finally:
            for site in made.values():
                site.sample = None
    return thresholds


@torch.no_grad()
def calibrate_offsets(model: nn.Module, windows: torch.Tensor, centre: str, *, device: str | None = None,
                      progress: bool = True) -> None:
    """Give every Top-K site of ``model`` (simulated or folded) its centring offset: the per-coordinate mean or
    median of what it ranks (its rotated input), over calibration tokens, layer by layer, each layer centred
    before the next is measured."""
    generator = torch.Generator().manual_seed(0)
    rows = max(1, CENTRE_TOKENS // len(windows))
    for _, layer, call, hidden in passes(model, windows, "offsets", device, progress):
        made = site_protocol.of(layer)
        if made is None or not all(isinstance(site, TopKSite) for site in made.values()):
            raise LarosaError("offsets are calibrated on a model carrying LaRoSa's Top-K sites")
        for site in made.values():
            site.rows, site.offset = RowSample(rows, generator), None
        try:
            advance(layer, call, hidden)
            for site in made.values():
                site.offset = centre_of(site.rows.all(), centre).to(hidden.device, hidden.dtype)
        finally:
            for site in made.values():
                site.rows = None
    site_protocol.settings(model)["centre"] = centre


def use_thresholds(model: nn.Module, thresholds: Thresholds) -> None:
    """Switch every Top-K site of ``model`` to its calibrated threshold."""
    layers = adapter_for(model).layers()
    if len(thresholds) != len(layers):
        raise LarosaError(f"{len(thresholds)} layers of thresholds given for a model of {len(layers)} layers")
    for layer, layer_thresholds in zip(layers, thresholds):
        for name, site in site_protocol.of(layer).items():
            site.threshold = layer_thresholds[name]
    state = site_protocol.settings(model)
    state.update(select="threshold", thresholds=[dict(t) for t in thresholds])
