"""The methods LaRoSa is compared with, in the same harness: TEAL and CATS (simulate form).

TEAL (Liu et al. 2024) zeroes the entries of each linear projection's input whose magnitude is under a threshold
chosen per layer and projection; CATS (Lee et al. 2024) zeroes the MLP's gate activations under a per-layer
threshold, which makes the matching up_proj rows and down_proj columns unnecessary. Thresholds are quantiles of
the dense model's activations on calibration tokens, so, unlike Top-K, a site's sparsity varies from token to
token and only averages what was asked: compare methods on measured parameter-weighted sparsity.

Their sites follow the site protocol (:mod:`larosa.sparsity.sites`), so removing them, measuring their sparsity
and perplexity work on them as on LaRoSa's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import Adapter, Dims, adapter_for
from ..errors import LarosaError
from ..rotations import Rotations
from ..streaming import CENTRES, Chooser, layerwise, output_error, quantile
from . import sites as site_protocol
from .levels import MAX_SITE, SCORES, check_target, greedy_levels, site_weights

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# The signal each projection reads: q/k/v share the attention norm's output, gate/up the MLP norm's.
INPUT_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
            "down": "down_in"}
METHODS = ("teal", "teal-greedy", "cats")
LEGACY_NAMES = {"teal-uniform": "teal"}  # settings saved by larosa 0.1


@dataclass(frozen=True)
class TealConfig:
    """TEAL: magnitude thresholds per layer and projection, calibrated on ``calib`` ([n, seq_len] token ids) for
    the parameter-weighted ``target``; ``greedy`` allocates it per projection by layer output error. ``centre``
    ("mean" or "median") thresholds each input's distance from its per-coordinate offset instead of its magnitude;
    ``rotations`` first turns the model's residual stream into the basis of their global Q (LaRoSa's folded global
    form at sparsity 0, no adapters), so the thresholds rank rotated inputs. ``score="weight"`` first rescales the
    model (:func:`larosa.fold.weight_scaled`) so that they rank |x_i| times the norm of the weight column x_i meets
    (WINA's score), free at run time. All three are extensions: TEAL does none of them.
    """

    target: float
    calib: torch.Tensor
    greedy: bool = False
    step: float = 0.05
    centre: str | None = None
    rotations: Rotations | None = None
    score: str = "magnitude"

    def __post_init__(self) -> None:
        check_target(self.target)
        if self.score not in SCORES:
            raise LarosaError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.greedy and self.target > MAX_SITE:
            raise LarosaError(f"greedy TEAL leaves every projection at most {MAX_SITE} sparse; target {self.target} "
                              "is too high")
        if not 0.0 < self.step <= 1.0:
            raise LarosaError(f"greedy step must be in (0, 1], got {self.step!r}")
        if self.centre is not None and self.centre not in CENTRES:
            raise LarosaError(f"centre must be one of {', '.join(CENTRES)}, got {self.centre!r}")

    @property
    def method(self) -> str:
        return "teal-greedy" if self.greedy else "teal"


@dataclass(frozen=True)
class CatsConfig:
    """CATS: one threshold per layer on the MLP's gate activation, calibrated on ``calib`` for the
    parameter-weighted ``target``."""

    target: float
    calib: torch.Tensor

    def __post_init__(self) -> None:
        check_target(self.target)

    method = "cats"


class ThresholdSite(site_protocol.Site):
    """Zeroes the entries whose score is under ``threshold`` and counts the zeros it feeds the weights.

    The score is |x| (TEAL), or |act(x)| with x the gate projection's output (CATS): a zeroed pre-activation
    gives act(0) = 0, so the down_proj input is zero there and the up_proj row is not needed. ``columns`` are
    the entries it decides, the others passing untouched: the gate's half of a fused gate | up output. With an
    ``offset`` (centring, TEAL only) the score is |x - offset| and a dropped entry stands at its offset, which is
    what the weights compute with W·offset added as a bias.
    """

    def __init__(self, threshold: float, weights: int, act: Callable | None = None, columns: slice = slice(None),
                 offset: torch.Tensor | None = None):
        super().__init__(weights)
        self.threshold = threshold
        self.act = act
        self.columns = columns
        self.register_buffer("offset", offset)  # saved with the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decided = x[..., self.columns]
        if self.offset is not None:
            centred = decided - self.offset
            return self.count(centred.masked_fill(centred.abs() < self.threshold, 0)) + self.offset
        score = decided if self.act is None else self.act(decided)
        kept = self.count(decided.masked_fill(score.abs() < self.threshold, 0))
        if self.columns == slice(None):
            return kept
        x = x.clone()
        x[..., self.columns] = kept
        return x


def _linear(adapter: Adapter, layer: nn.Module, projection: str) -> nn.Linear:
    if projection == "o":
        return adapter.o_proj(layer)
    if projection == "down":
        return adapter.down_proj(layer)
    return adapter.projection(layer, projection)[0]


def _projections(adapter: Adapter, layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's Linears, each named by the projections it computes: q, k, v, o, gate, up and down, or their
    names joined where the family fuses them (``q+k+v``, ``gate+up``). A TEAL threshold acts on a Linear's
    input, so the projections of one fused Linear share theirs."""
    names: dict[nn.Linear, list[str]] = {}
    for p in PROJECTIONS:
        names.setdefault(_linear(adapter, layer, p), []).append(p)
    return {"+".join(ps): linear for linear, ps in names.items()}


def _input_of(projection: str) -> str:
    """The signal a (possibly fused) projection reads."""
    return INPUT_OF[projection.split("+")[0]]


def _activation(adapter: Adapter) -> Callable:
    """The MLP's gate activation; CATS needs act(0) = 0 so that a zeroed pre-activation is a skipped entry."""
    act = adapter.activation()
    if act(torch.zeros(1)).item() != 0.0:
        raise LarosaError(f"CATS needs a gate activation with act(0) = 0; {act.__class__.__name__} is not")
    return act


# -- attaching sites ----------------------------------------------------------------------------------------
def _copy(offset: torch.Tensor | None) -> torch.Tensor | None:
    """Each site its own tensor: a checkpoint refuses buffers that share one."""
    return None if offset is None else offset.clone()


def _teal_sites(adapter: Adapter, layer: nn.Module, thresholds: dict[str, float],
                offsets: dict[str, torch.Tensor] | None = None):
    """One site per projection, on its input: q, k and v (gate and up) may have different thresholds, unless one
    fused Linear computes them; ``offsets`` are per input signal (attn_in, o_in, mlp_in, down_in)."""
    projections = _projections(adapter, layer)
    offsets = offsets or {}
    made = {p: ThresholdSite(thresholds[p], linear.weight.numel(), offset=_copy(offsets.get(_input_of(p))))
            for p, linear in projections.items()}
    return made, [(linear, "input", made[p]) for p, linear in projections.items()]


def _attach_cats(adapter: Adapter, layer: nn.Module, threshold: float, act: Callable) -> nn.ModuleDict:
    """One site on the gate projection's output (its half of a fused gate | up output); it gates the up rows and
    down_proj columns."""
    gate, gate_rows = adapter.projection(layer, "gate")
    up, up_rows = adapter.projection(layer, "up")
    site = ThresholdSite(threshold, up.weight[up_rows].numel() + adapter.down_proj(layer).weight.numel(), act,
                         gate_rows)
    return site_protocol.attach(layer, {"cats": site}, [(gate, "output", site)])


def teal_thresholds(model: nn.Module) -> list[dict[nn.Linear, tuple[float, torch.Tensor | None]]] | None:
    """Each layer's TEAL threshold and centring offset (None uncentred) per Linear (the projections of a fused
    Linear share them), for the decode engine; None where ``model`` is not sparsified by TEAL."""
    settings = site_protocol.settings(model) or {}
    if LEGACY_NAMES.get(settings.get("method"), settings.get("method")) not in ("teal", "teal-greedy"):
        return None
    adapter = adapter_for(model)
    return [{linear: (plan[p]["threshold"], site_protocol.of(layer)[p].offset)
             for p, linear in _projections(adapter, layer).items()}
            for layer, plan in zip(adapter.layers(), settings["layers"])]



def restore(model: nn.Module, settings: dict, offsets: Sequence[dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Make ``model`` sparse in place with saved :func:`teal` or :func:`cats` settings, without recalibrating.

    Centred settings need each layer's ``offsets`` (per input signal); a saved model loads them over zeros."""
    adapter = adapter_for(model)
    site_protocol.refuse_folded(model)
    method = LEGACY_NAMES.get(settings.get("method"), settings.get("method"))
    if method not in METHODS:
        raise LarosaError(f"settings method must be one of {', '.join(METHODS)}, got {method!r}")
    layers = adapter.layers()
    if len(settings["layers"]) != len(layers):
        raise LarosaError(f"settings are for {len(settings['layers'])} layers, the model has {len(layers)}")
    act = _activation(adapter) if method == "cats" else None
    if settings.get("centre") and offsets is None:
        raise LarosaError("centred TEAL settings need their offsets (saved with the model's weights)")
    if offsets is not None and len(offsets) != len(layers):
        raise LarosaError(f"offsets are for {len(offsets)} layers, the model has {len(layers)}")
    site_protocol.remove(model)
    for i, (layer, plan) in enumerate(zip(layers, settings["layers"])):
        if method == "cats":
            _attach_cats(adapter, layer, plan["cats"]["threshold"], act)
        else:
            thresholds = {p: plan[p]["threshold"] for p in _projections(adapter, layer)}
            site_protocol.attach(layer, *_teal_sites(adapter, layer, thresholds, offsets and offsets[i]))
    site_protocol.install(model, {**settings, "method": method, "mode": "simulate"})
    return model


# -- calibration --------------------------------------------------------------------------------------------
def _teal_plan(values: dict[str, torch.Tensor], sparsity: dict[str, float]) -> dict:
    return {p: {"sparsity": level, "threshold": quantile(values[_input_of(p)], level)} for p, level in sparsity.items()}


def _greedy(adapter: Adapter, target: float, step: float) -> Chooser:
    """TEAL's block-wise greedy allocation over the seven projections (the layer's Linears where some are fused),
    by layer output error (the thresholds of each trial are the quantiles of that projection's input)."""

    def choose(i, layer, call, values, inputs, offsets) -> dict:
        weights = {p: m.weight.numel() for p, m in _projections(adapter, layer).items()}
        error = output_error(layer, call, inputs)
        with site_protocol.attached(layer, *_teal_sites(adapter, layer, dict.fromkeys(weights, 0.0),
                                                        offsets)) as sites:

            def trial_error(levels: dict[str, float]) -> float:
                for p, level in levels.items():
                    sites[p].threshold = quantile(values[_input_of(p)], level)
                return error()

            sparsity = greedy_levels(weights, target, step, trial_error)
        return _teal_plan(values, sparsity)

    return choose


def _input_tap(signal: str) -> Callable:
    """A tap on ``signal`` (attn_in, o_in, mlp_in or down_in): the input of the first Linear reading it."""
    def tap(adapter: Adapter, layer: nn.Module):
        linear = next(m for p, m in _projections(adapter, layer).items() if _input_of(p) == signal)
        return linear, lambda x, out: x

    return tap


def teal(model: nn.Module, config: TealConfig, *, device: str | None = None, progress: bool = True) -> dict:
    """Calibrate TEAL thresholds on ``config.calib`` and make ``model`` sparse in place.

    Uniform mode puts every projection at the target; greedy mode allocates it per layer and projection by
    layer output error (:func:`_greedy`). Returns the JSON-serialisable settings that :func:`restore` re-applies
    (with the centring offsets, which stay on the model's sites: saving the model saves them).
    """
    adapter = adapter_for(model)
    site_protocol.refuse_folded(model)
    site_protocol.remove(model)
    start = time.perf_counter()
    taps = {signal: _input_tap(signal) for signal in ("attn_in", "o_in", "mlp_in", "down_in")}

    def uniform(i, layer, call, values, inputs, offsets) -> dict:
        return _teal_plan(values, dict.fromkeys(_projections(adapter, layer), config.target))

    pick = _greedy(adapter, config.target, config.step) if config.greedy else uniform
    offsets: list[dict[str, torch.Tensor]] = []

    def choose(i, layer, call, values, inputs, layer_offsets) -> dict:
        offsets.append({name: o.cpu() for name, o in layer_offsets.items()})
        return pick(i, layer, call, values, inputs, layer_offsets)

    windows = config.calib
    layers = layerwise(model, windows, taps, choose, config.method, device, progress, config.centre)
    settings = {"method": config.method, "target": config.target, **({"step": config.step} if config.greedy else {}),
                **({"centre": config.centre} if config.centre else {}),
                **({"rotated": "global"} if config.rotations is not None else {}),
                **({"score": config.score} if config.score != "magnitude" else {}), "windows": windows.shape[0],
                "seq_len": windows.shape[1], "seconds": round(time.perf_counter() - start, 3), "layers": layers}
    restore(model, settings, offsets if config.centre else None)
    return settings


def cats_level(dims: Dims, target: float) -> float:
    """The CATS gate sparsity that gives parameter-weighted sparsity ``target``.

    CATS skips only up_proj rows and down_proj columns (2 d i weights per layer), so the gate level is the target
    scaled by the layer's linear weights over 2 d i; a target above that share is out of reach.
    """
    check_target(target)
    share = 2 * dims.hidden * dims.intermediate / sum(site_weights(dims).values())
    if target >= share:
        raise LarosaError(f"CATS skips at most {share:.1%} of the weight reads (up_proj and down_proj); "
                          f"target {target} is out of reach")
    return target / share


def cats(model: nn.Module, config: CatsConfig, *, device: str | None = None, progress: bool = True) -> dict:
    """Calibrate CATS gate thresholds on ``config.calib`` and make ``model`` sparse in place (MLP only).

    Returns the JSON-serialisable settings that :func:`restore` re-applies.
    """
    adapter = adapter_for(model)
    site_protocol.refuse_folded(model)
    level = cats_level(adapter.dims, config.target)
    act = _activation(adapter)
    site_protocol.remove(model)
    start = time.perf_counter()

    def gate_tap(adapter: Adapter, layer: nn.Module):
        gate, rows = adapter.projection(layer, "gate")
        return gate, lambda x, out: act(out[..., rows])

    taps = {"gate": gate_tap}

    def choose(i, layer, call, values, inputs, offsets) -> dict:
        return {"cats": {"sparsity": level, "threshold": quantile(values["gate"], level)}}

    windows = config.calib
    layers = layerwise(model, windows, taps, choose, "cats", device, progress)
    settings = {"method": "cats", "target": config.target, "level": level, "windows": windows.shape[0],
                "seq_len": windows.shape[1], "seconds": round(time.perf_counter() - start, 3), "layers": layers}
    restore(model, settings)
    return settings
