"""LaRoSa's free parameters, searched on calibration data instead of hard-coded: a :class:`Plan` of per-layer site
levels that holds the model's parameter-weighted sparsity (the share of decoder weight reads skipped) at a target.

- the split (the paper's Algorithm 1): a grid over how much sparsity the rotated sites (attention and MLP inputs)
  take against the plain ones (o_proj and down_proj inputs), the same in every layer, scored by calibration NLL.
  The reference code fixes it at 0.8 / 1.2.
- per layer, the four sites' levels from TEAL's greedy allocation on that layer's output error (Top-K on the
  rotated inputs), every layer at the target.

Candidates are scored by NLL on held-out windows, not on those the greedy fits (nor, in the CLI, those the rotations
were calibrated on), and the reference code's fixed split is kept unless a candidate beats it there by ``margin``:
scored on its own 4 fitting windows, the search picked a split that was worse on the evaluation text than the
fixed one (a second model: 33.8 against 32.5 PPL at 50 %).

Moving sparsity between layers was tried first (each layer's factor 0.5 to 1.5 around the split, allocated
greedily from the calibration NLL with one layer moved at a time): the single-layer costs did not add up, and on
SmolLM2 the plans piled sparsity on the last layers and raised WikiText-2 PPL over the plain split (global scope:
25.2 to 29.1 at 40 %), so every layer keeps the target.

A model from :func:`larosa.models.load_lazy` is searched with one decoder layer resident at a time (every trial
streamed, see :func:`larosa.eval.perplexity_streamed`), so a model larger than the GPU or RAM can be searched too.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import adapter_for
from .errors import LarosaError
from .eval import perplexity, perplexity_streamed
from .models import is_lazy
from .rotations import Rotations, config_hash, weights_fingerprint
from .sparsity import sites
from .sparsity.levels import (Sparsity, SparsityConfig, check_target, config_for_target, default_config, greedy_levels,
                              keep_count, site_weights)
from .sparsity.plan import Plan
from .sparsity.topk import LaRoSaConfig, prepare, simulate
from .streaming import layerwise, output_error

SPLIT_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)  # rotated-site level as a multiple of the target
GREEDY_STEP = 0.05  # a site's level rises by this much per greedy step


def _nll(model: nn.Module, rotations: Rotations, windows: torch.Tensor, sparsity: Sparsity, *, scope: str,
         score: str, batch_size: int, device: str | None) -> float:
    """Calibration NLL of ``sparsity``. A lazily loaded model's weights are not in memory
    (:func:`larosa.models.load_lazy`), so it is scored one layer at a time on ``device``; otherwise by whole-model
    forwards where it is."""
    config = LaRoSaConfig(rotations, sparsity=sparsity, scope=scope, score=score)
    if is_lazy(model):
        return math.log(perplexity_streamed(model, windows, config, device=device, progress=False)["ppl"])
    simulate(model, config)
    try:
        return math.log(perplexity(model, windows, batch_size=batch_size, progress=False)["ppl"])
    finally:
        sites.remove(model)


@torch.no_grad()
def search_split(model: nn.Module, rotations: Rotations, windows: torch.Tensor, target: float, *,
                 scope: str = "block", score: str = "magnitude", grid=SPLIT_GRID, batch_size: int = 1,
                 device: str | None = None, progress: bool = True) -> dict:
    """The grid point with the lowest calibration NLL; {"config", "rotated_multiple", "trials"}."""
    check_target(target)
    dims = adapter_for(model).dims
    trials = []
    for m in tqdm(grid, desc=f"split search @ {target:.2f}", disable=not progress):
        config = config_for_target(dims, target, m)
        if config is None:
            continue
        nll = _nll(model, rotations, windows, config, scope=scope, score=score, batch_size=batch_size,
                   device=device)
        trials.append({"rotated_multiple": m, "sites": config.sites(), "nll": nll})
    if not trials:
        raise LarosaError(f"no split of the grid reaches parameter-weighted sparsity {target}")
    best = min(trials, key=lambda t: t["nll"])
    return {"config": SparsityConfig(**best["sites"]), "rotated_multiple": best["rotated_multiple"],
            "trials": trials}


@torch.no_grad()
def greedy_plan(model: nn.Module, rotations: Rotations, windows: torch.Tensor, target: float, *,
                scope: str = "block", score: str = "magnitude", step: float = GREEDY_STEP,
                device: str | None = None, progress: bool = True) -> list[SparsityConfig]:
    """Per layer, the sites' levels that reach ``target`` with the least layer output error, raised greedily
    (:func:`larosa.sparsity.levels.greedy_levels`) on the dense model's inputs to that layer; each layer visits
    ``device`` in turn (default: cuda when available), so a lazily loaded model works too."""
    check_target(target)
    weights = site_weights(adapter_for(model).dims)
    sites.remove(model)
    attach = prepare(model, LaRoSaConfig(rotations, sparsity=SparsityConfig(0.0, 0.0, 0.0, 0.0), scope=scope,
                                         score=score))[1]

    def choose(i, layer, call, values, inputs, offsets) -> dict:
        error = output_error(layer, call, inputs)
        layer_sites = attach(i, layer)

        def trial_error(levels: dict[str, float]) -> float:
            for site, level in levels.items():
                layer_sites[site].k = keep_count(level, layer_sites[site].size)
            return error()

        try:
            return greedy_levels(weights, target, step, trial_error)
        finally:
            sites.detach(layer)

    return [SparsityConfig(**levels)
            for levels in layerwise(model, windows, {}, choose, f"site search @ {target:.2f}", device, progress)]


MARGIN = 0.002  # nats a token a candidate must gain over the fixed split on held-out windows (0.2 % PPL)


def search(model: nn.Module, rotations: Rotations, windows: torch.Tensor, target: float, *,
           held_out: torch.Tensor | None = None, scope: str = "block", score: str = "magnitude", layers: bool = True,
           margin: float = MARGIN, batch_size: int = 1, device: str | None = None, data: str | None = None,
           progress: bool = True) -> Plan:
    """The fixed split, the best split of the grid and (with ``layers``) the per-layer greedy fitted on
    ``windows``, scored on ``held_out`` (default: ``windows`` themselves); the fixed split is kept unless another
    beats it by ``margin`` nats a token.

    ``device`` is where layers run one at a time (the greedy; every trial of a lazily loaded model);
    ``batch_size`` windows go through each whole-model forward of a model in memory; ``data`` names the text
    the windows came from, for the plan's record."""
    rotations.check_model(model)
    start = time.perf_counter()
    scored = windows if held_out is None else held_out
    dims = adapter_for(model).dims
    split = search_split(model, rotations, scored, target, scope=scope, score=score, batch_size=batch_size,
                         device=device, progress=progress)
    fixed = default_config(dims, target)
    candidates = {"default": [fixed] * dims.n_layers, "split": [split["config"]] * dims.n_layers}
    if layers:
        candidates["per-layer"] = greedy_plan(model, rotations, windows, target, scope=scope, score=score,
                                              device=device, progress=progress)
    nll = {"split": min(t["nll"] for t in split["trials"])}
    for name in ("default", "per-layer"):
        if name in candidates:
            nll[name] = _nll(model, rotations, scored, candidates[name], scope=scope, score=score,
                             batch_size=batch_size, device=device)
    best = min(nll, key=nll.get)
    chosen = best if nll[best] < nll["default"] - margin else "default"
    levels = candidates[chosen]
    return Plan(
        levels=tuple(levels), target=target, scope=scope, score=score, signal=rotations.signal,
        model={"name": str(getattr(model.config, "name_or_path", "") or model.config.model_type),
               "config_hash": config_hash(model.config), "weights_fingerprint": weights_fingerprint(model)},
        data=data or f"tensor[{windows.shape[0]}x{windows.shape[1]}]", windows=int(windows.shape[0]),
        held_out=0 if held_out is None else int(held_out.shape[0]), seq_len=int(windows.shape[1]), chosen=chosen,
        rotated_multiple=split["rotated_multiple"] if chosen == "split" else fixed.attn_in / target, nll=nll,
        split_trials=split["trials"], seconds=round(time.perf_counter() - start, 1),
    )
