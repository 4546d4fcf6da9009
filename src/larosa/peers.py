"""The methods LaRoSa is compared with, in the same harness: TEAL and CATS (simulate form).

TEAL (Liu et al. 2024) zeroes the entries of each linear projection's input whose magnitude is under a threshold
chosen per layer and projection; CATS (Lee et al. 2024) zeroes the MLP's gate activations under a per-layer
threshold, which makes the matching up_proj rows and down_proj columns unnecessary. Thresholds are quantiles of
the dense model's activations on calibration tokens, so, unlike Top-K, a site's sparsity varies from token to
token and only averages what was asked: compare methods on measured parameter-weighted sparsity.

The sites follow :mod:`larosa.sparsify`'s contract (``layer.larosa_sites``, ``model.larosa["handles"]``, long
``zeros``/``seen`` counters and the ``weights`` each site gates), so ``unsparsify``, ``site_sparsity``,
``measured_param_weighted`` and ``perplexity`` work on them unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN

from .adapters import Adapter, Dims, adapter_for
from .errors import LarosaError
from .layerwise import MAX_SITE, Chooser, greedy_levels, layerwise, output_error
from .sparsify import _refuse_folded, unsparsify

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# The signal each projection reads: q/k/v share the attention norm's output, gate/up the MLP norm's.
INPUT_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
            "down": "down_in"}
METHODS = ("teal-uniform", "teal-greedy", "cats")


class ThresholdSite(nn.Module):
    """Zeroes the entries whose score is under ``threshold`` and counts the zeros it feeds the weights.

    The score is |x| (TEAL), or |act(x)| with x the gate projection's output (CATS): a zeroed pre-activation
    gives act(0) = 0, so the down_proj input is zero there and the up_proj row is not needed.
    """

    def __init__(self, threshold: float, weights: int, act: Callable | None = None):
        super().__init__()
        self.threshold = threshold
        self.weights = weights  # weight elements this site gates: what a zero saves in reads
        self.act = act
        self.register_buffer("zeros", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x if self.act is None else self.act(x)
        x = x.masked_fill(score.abs() < self.threshold, 0)
        self.zeros += (x == 0).sum()
        self.seen += x.numel()
        return x


def _check_target(target: float) -> None:
    if isinstance(target, bool) or not (isinstance(target, (int, float)) and 0.0 <= target < 1.0):
        raise LarosaError(f"target sparsity must be in [0, 1), got {target!r}")


def _projections(adapter: Adapter, layer: nn.Module) -> dict[str, nn.Linear]:
    q, k, v = adapter.qkv(layer)
    gate, up = adapter.gate_up(layer)
    return {"q": q, "k": k, "v": v, "o": adapter.o_proj(layer), "gate": gate, "up": up,
            "down": adapter.down_proj(layer)}


def _activation(model: nn.Module) -> Callable:
    """The MLP's gate activation; CATS needs act(0) = 0 so that a zeroed pre-activation is a skipped entry."""
    act = ACT2FN[model.config.hidden_act]
    if act(torch.zeros(1)).item() != 0.0:
        raise LarosaError(f"CATS needs a gate activation with act(0) = 0; {model.config.hidden_act!r} is not")
    return act


# -- attaching sites ----------------------------------------------------------------------------------------
def _attach_teal(adapter: Adapter, layer: nn.Module, thresholds: dict[str, float]) -> list:
    """One site per projection, on its input: q, k and v (gate and up) may have different thresholds."""
    projections = _projections(adapter, layer)
    sites = {p: ThresholdSite(thresholds[p], projections[p].weight.numel()) for p in PROJECTIONS}
    layer.larosa_sites = nn.ModuleDict(sites).to(projections["o"].weight.device)
    return [projections[p].register_forward_pre_hook(_pre_hook(sites[p])) for p in PROJECTIONS]


def _pre_hook(site: ThresholdSite):
    return lambda module, args: (site(args[0]), *args[1:])


def _attach_cats(adapter: Adapter, layer: nn.Module, threshold: float, act: Callable) -> list:
    """One site on the gate projection's output; it gates the up_proj rows and down_proj columns."""
    gate, up = adapter.gate_up(layer)
    site = ThresholdSite(threshold, up.weight.numel() + adapter.down_proj(layer).weight.numel(), act)
    layer.larosa_sites = nn.ModuleDict({"cats": site}).to(gate.weight.device)
    return [gate.register_forward_hook(lambda module, args, out: site(out))]


def apply(model: nn.Module, settings: dict) -> nn.Module:
    """Make ``model`` sparse in place with saved :func:`teal` or :func:`cats` settings, without recalibrating."""
    adapter = adapter_for(model)
    _refuse_folded(model)
    method = settings.get("method")
    if method not in METHODS:
        raise LarosaError(f"settings method must be one of {', '.join(METHODS)}, got {method!r}")
    layers = adapter.layers()
    if len(settings["layers"]) != len(layers):
        raise LarosaError(f"settings are for {len(settings['layers'])} layers, the model has {len(layers)}")
    act = _activation(model) if method == "cats" else None
    unsparsify(model)
    handles = []
    for layer, plan in zip(layers, settings["layers"]):
        if method == "cats":
            handles += _attach_cats(adapter, layer, plan["cats"]["threshold"], act)
        else:
            handles += _attach_teal(adapter, layer, {p: plan[p]["threshold"] for p in PROJECTIONS})
    model.larosa = {"handles": handles, "method": method, "target": settings["target"]}
    return model


# -- calibration --------------------------------------------------------------------------------------------
def _threshold(values: torch.Tensor, sparsity: float) -> float:
    """Zeroing |x| < threshold drops a share ``sparsity`` of the sorted sample; 0 keeps everything."""
    if sparsity <= 0.0:
        return 0.0
    return values[min(round(sparsity * len(values)), len(values) - 1)].item()




def _teal_plan(values: dict[str, torch.Tensor], sparsity: dict[str, float]) -> dict:
    return {p: {"sparsity": sparsity[p], "threshold": _threshold(values[INPUT_OF[p]], sparsity[p])}
            for p in PROJECTIONS}


def _greedy(adapter: Adapter, target: float, step: float) -> Chooser:
    """TEAL's block-wise greedy allocation over the seven projections, by layer output error (the thresholds of
    each trial are the quantiles of that projection's input)."""

    def choose(i, layer, call, values, inputs) -> dict:
        weights = {p: m.weight.numel() for p, m in _projections(adapter, layer).items()}
        error = output_error(layer, call, inputs)
        handles = _attach_teal(adapter, layer, dict.fromkeys(PROJECTIONS, 0.0))
        sites = layer.larosa_sites

        def trial_error(levels: dict[str, float]) -> float:
            for p in PROJECTIONS:
                sites[p].threshold = _threshold(values[INPUT_OF[p]], levels[p])
            return error()

        try:
            sparsity = greedy_levels(weights, target, step, trial_error)
        finally:
            for h in handles:
                h.remove()
            del layer._modules["larosa_sites"]
        return _teal_plan(values, sparsity)

    return choose


def _input_tap(projection: str) -> Callable:
    def tap(adapter: Adapter, layer: nn.Module):
        return _projections(adapter, layer)[projection], lambda x, out: x

    return tap


def teal(model: nn.Module, windows: torch.Tensor, target: float, *, greedy: bool = False, step: float = 0.05,
         device: str | None = None, progress: bool = True) -> dict:
    """Calibrate TEAL thresholds on ``windows`` ([n, seq_len] token ids) and make ``model`` sparse in place.

    ``target`` is the parameter-weighted sparsity. Uniform mode puts every projection at ``target``; greedy mode
    allocates it per layer and projection by layer output error (:func:`_greedy`). Returns the JSON-serialisable
    settings that :func:`apply` re-applies.
    """
    adapter = adapter_for(model)
    _refuse_folded(model)
    _check_target(target)
    if greedy and target > MAX_SITE:
        raise LarosaError(f"greedy TEAL leaves every projection at most {MAX_SITE} sparse; target {target} is too high")
    if not 0.0 < step <= 1.0:
        raise LarosaError(f"greedy step must be in (0, 1], got {step!r}")
    unsparsify(model)
    start = time.perf_counter()
    taps = {"attn_in": _input_tap("q"), "o_in": _input_tap("o"), "mlp_in": _input_tap("gate"),
            "down_in": _input_tap("down")}

    def uniform(i, layer, call, values, inputs) -> dict:
        return _teal_plan(values, dict.fromkeys(PROJECTIONS, target))

    choose = _greedy(adapter, target, step) if greedy else uniform
    layers = layerwise(model, windows, taps, choose, "teal", device, progress)
    settings = {"method": "teal-greedy" if greedy else "teal-uniform", "target": target,
                **({"step": step} if greedy else {}), "windows": windows.shape[0], "seq_len": windows.shape[1],
                "seconds": round(time.perf_counter() - start, 3), "layers": layers}
    apply(model, settings)
    return settings


def cats_level(dims: Dims, target: float) -> float:
    """The CATS gate sparsity that gives parameter-weighted sparsity ``target``.

    CATS skips only up_proj rows and down_proj columns (2 d i weights per layer), so the gate level is the target
    scaled by the layer's linear weights over 2 d i; a target above that share is out of reach.
    """
    _check_target(target)
    share = 2 * dims.hidden * dims.intermediate / sum(dims.site_weights().values())
    if target >= share:
        raise LarosaError(f"CATS skips at most {share:.1%} of the weight reads (up_proj and down_proj); "
                          f"target {target} is out of reach")
    return target / share


def cats(model: nn.Module, windows: torch.Tensor, target: float, *, device: str | None = None,
         progress: bool = True) -> dict:
    """Calibrate CATS gate thresholds on ``windows`` and make ``model`` sparse in place (MLP only).

    ``target`` is the parameter-weighted sparsity (see :func:`cats_level`). Returns the JSON-serialisable
    settings that :func:`apply` re-applies.
    """
    adapter = adapter_for(model)
    _refuse_folded(model)
    level = cats_level(adapter.dims, target)
    act = _activation(model)
    unsparsify(model)
    start = time.perf_counter()
    taps = {"gate": lambda adapter, layer: (adapter.gate_up(layer)[0], lambda x, out: act(out))}

    def choose(i, layer, call, values, inputs) -> dict:
        return {"cats": {"sparsity": level, "threshold": _threshold(values["gate"], level)}}

    layers = layerwise(model, windows, taps, choose, "cats", device, progress)
    settings = {"method": "cats", "target": target, "level": level, "windows": windows.shape[0],
                "seq_len": windows.shape[1], "seconds": round(time.perf_counter() - start, 3), "layers": layers}
    apply(model, settings)
    return settings
