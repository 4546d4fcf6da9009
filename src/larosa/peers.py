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

import math
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.activations import ACT2FN

from .adapters import Adapter, Dims, adapter_for
from .calibrate import _first_layer_inputs
from .errors import LarosaError
from .models import default_device
from .sparsify import _refuse_folded, unsparsify

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# The signal each projection reads: q/k/v share the attention norm's output, gate/up the MLP norm's.
INPUT_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
            "down": "down_in"}
METHODS = ("teal-uniform", "teal-greedy", "cats")
SAMPLE = 1 << 20  # |x| values kept per site and layer: quantiles to ~1e-3, and cheap to sort
GREEDY_TOKENS = 4096  # calibration tokens the greedy search measures layer output error on
MAX_SITE = 0.99  # the greedy search leaves at least 1 % of every projection's input


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
class _Sample:
    """A random subsample of one site's |score| over the calibration tokens, for quantiles.

    torch.quantile refuses large inputs and a full sort of every token would not fit on the device for big
    models, so each window contributes a fixed number of random tokens (all of them when few).
    """

    def __init__(self, n_windows: int, generator: torch.Generator):
        self.n_windows, self.generator = n_windows, generator
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        rows = min(x.shape[0], math.ceil(SAMPLE / (x.shape[1] * self.n_windows)))
        idx = torch.randperm(x.shape[0], generator=self.generator)[:rows].to(x.device)
        self.parts.append(x[idx].abs().float().flatten())

    def sorted(self) -> torch.Tensor:
        return torch.cat(self.parts).sort().values.cpu()


def _threshold(values: torch.Tensor, sparsity: float) -> float:
    """Zeroing |x| < threshold drops a share ``sparsity`` of the sorted sample; 0 keeps everything."""
    if sparsity <= 0.0:
        return 0.0
    return values[min(round(sparsity * len(values)), len(values) - 1)].item()


def _run(layer: nn.Module, call: tuple, x: torch.Tensor) -> torch.Tensor:
    args, kwargs = call
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# Turns one layer's sorted samples (and, for a search, its dense inputs) into that layer's plan.
Chooser = Callable[[nn.Module, tuple, dict[str, torch.Tensor], torch.Tensor], dict]


@torch.no_grad()
def _layerwise(model: nn.Module, windows: torch.Tensor, taps: dict[str, Callable], choose: Chooser,
               desc: str, device: str | None, progress: bool) -> list[dict]:
    """Run the dense model layer by layer on ``windows`` (one layer on the device at a time, as calibrate does),
    sampling what ``taps`` read at each layer, and return ``choose``'s plan for every layer.

    ``taps`` maps a sample name to a function of (adapter, layer) giving the module to hook and how to read
    the signal from its (input, output).
    """
    adapter = adapter_for(model)
    device = torch.device(device or default_device())
    hidden, calls = _first_layer_inputs(adapter, windows, device)
    kept = max(1, min(len(windows), GREEDY_TOKENS // windows.shape[1]))
    generator = torch.Generator().manual_seed(0)
    plans = []
    for i, layer in enumerate(tqdm(adapter.layers(), desc=desc, unit="layer", disable=not progress)):
        home = next(layer.parameters()).device
        layer.to(device)
        samples = {name: _Sample(len(windows), generator) for name in taps}
        try:
            handles = []
            for name, tap in taps.items():
                module, read = tap(adapter, layer)
                handles.append(module.register_forward_hook(
                    lambda m, a, out, s=samples[name], read=read: s.add(read(a[0], out))))
            inputs = hidden[:kept].clone()
            try:
                for j in range(hidden.shape[0]):
                    hidden[j] = _run(layer, calls[i], hidden[j : j + 1])[0]
            finally:
                for h in handles:
                    h.remove()
            values = {name: s.sorted() for name, s in samples.items()}
            plans.append(choose(layer, calls[i], values, inputs))
        finally:
            layer.to(home)
    return plans


def _teal_plan(values: dict[str, torch.Tensor], sparsity: dict[str, float]) -> dict:
    return {p: {"sparsity": sparsity[p], "threshold": _threshold(values[INPUT_OF[p]], sparsity[p])}
            for p in PROJECTIONS}


def _greedy(adapter: Adapter, target: float, step: float) -> Chooser:
    """TEAL's block-wise greedy allocation: from all-dense, repeatedly raise by ``step`` the projection whose
    raise costs the least added layer output error per weight read skipped, until the layer's
    parameter-weighted sparsity is ``target`` (the last raise is partial, so it lands on it).

    The cost is per weight skipped because projections differ in size: an unnormalised comparison would
    favour the small k and v projections for saving little.
    """

    def choose(layer, call, values, inputs) -> dict:
        weights = {p: m.weight.numel() for p, m in _projections(adapter, layer).items()}
        goal = target * sum(weights.values())
        sparsity = dict.fromkeys(PROJECTIONS, 0.0)
        dense = _run(layer, call, inputs).float()  # all kept windows in one call: the masks broadcast
        norm = dense.pow(2).sum()
        handles = _attach_teal(adapter, layer, sparsity)
        sites = layer.larosa_sites

        def error(trial: dict[str, float]) -> float:
            """||y - y_dense||² / ||y_dense||² of the layer's output on the kept calibration windows."""
            for p in PROJECTIONS:
                sites[p].threshold = _threshold(values[INPUT_OF[p]], trial[p])
            return ((_run(layer, call, inputs).float() - dense).pow(2).sum() / norm).item()

        try:
            current = 0.0
            while (missing := goal - sum(sparsity[p] * weights[p] for p in PROJECTIONS)) > 1e-9 * goal:
                best = None
                for p in PROJECTIONS:
                    raise_by = min(step, MAX_SITE - sparsity[p], missing / weights[p])
                    if raise_by <= 1e-12:
                        continue
                    trial = {**sparsity, p: sparsity[p] + raise_by}
                    e = error(trial)
                    cost = (e - current) / (raise_by * weights[p])
                    if best is None or cost < best[0]:
                        best = (cost, e, trial)
                _, current, sparsity = best
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

    def uniform(layer, call, values, inputs) -> dict:
        return _teal_plan(values, dict.fromkeys(PROJECTIONS, target))

    choose = _greedy(adapter, target, step) if greedy else uniform
    layers = _layerwise(model, windows, taps, choose, "teal", device, progress)
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

    def choose(layer, call, values, inputs) -> dict:
        return {"cats": {"sparsity": level, "threshold": _threshold(values["gate"], level)}}

    layers = _layerwise(model, windows, taps, choose, "cats", device, progress)
    settings = {"method": "cats", "target": target, "level": level, "windows": windows.shape[0],
                "seq_len": windows.shape[1], "seconds": round(time.perf_counter() - start, 3), "layers": layers}
    apply(model, settings)
    return settings
