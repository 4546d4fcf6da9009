"""LaRoSa's free parameters, searched on calibration data instead of hard-coded.

Both searches hold the model's parameter-weighted sparsity (the share of decoder weight reads skipped) at the
target:

- the split (the paper's Algorithm 1): a grid over how much sparsity the rotated sites (attention and MLP inputs)
  take against the plain ones (o_proj and down_proj inputs), the same in every layer, scored by calibration NLL.
  The reference code fixes it at 0.8 / 1.2.
- per layer, the four sites' levels from TEAL's greedy allocation on that layer's output error (Top-K on the
  rotated inputs), every layer at the target. It is kept only where it beats the split on calibration NLL.

Moving sparsity between layers was tried first (each layer's factor 0.5 to 1.5 around the split, allocated
greedily from the calibration NLL with one layer moved at a time): the single-layer costs did not add up, and on
SmolLM2 the plans piled sparsity on the last layers and raised WikiText-2 PPL over the plain split (global scope:
25.2 to 29.1 at 40 %), so every layer keeps the target.

A plan is a list of per-layer :class:`SparsityConfig`; it is stored in the rotations file and used by eval and
sparsify. A model from :func:`larosa.models.load_lazy` is searched with one decoder layer resident at a time
(every trial streamed, see :func:`larosa.evaluate.perplexity_streamed`), so a model larger than the GPU or RAM
can be searched too.
"""

from __future__ import annotations

import json
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Dims, adapter_for
from .errors import LarosaError
from .evaluate import perplexity, perplexity_streamed
from .layerwise import greedy_levels, layerwise, output_error
from .models import is_lazy
from .rotations import Rotations
from .sparsify import (DEFAULT_SPLIT, SITES, Sparsity, SparsityConfig, attach_sites, keep_count, site_inputs,
                       sparsify, unsparsify)

SPLIT_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)  # rotated-site level as a multiple of the target
ROTATED, PLAIN = ("attn_in", "mlp_in"), ("o_in", "down_in")


def config_for_target(dims: Dims, target: float, rotated_multiple: float) -> SparsityConfig | None:
    """Rotated sites at ``rotated_multiple * target``, plain sites at what makes the parameter-weighted
    sparsity equal ``target``; None where that needs a level outside [0, 1)."""
    w = dims.site_weights()
    rotated_w, plain_w = sum(w[s] for s in ROTATED), sum(w[s] for s in PLAIN)
    r = rotated_multiple * target
    p = (target * (rotated_w + plain_w) - r * rotated_w) / plain_w
    if not (0 <= r < 1 and 0 <= p < 1):
        return None
    return SparsityConfig(attn_in=r, o_in=p, mlp_in=r, down_in=p)


def default_config(dims: Dims, target: float, split: tuple[float, float] = DEFAULT_SPLIT) -> SparsityConfig:
    """The fixed split at the nominal level whose parameter-weighted sparsity is ``target``."""
    _check_target(target)
    per_unit = SparsityConfig.from_nominal(0.5, split).param_weighted(dims) / 0.5
    return SparsityConfig.from_nominal(target / per_unit, split)


def _check_target(target: float) -> None:
    if not (isinstance(target, (int, float)) and 0 < target < 1):
        raise LarosaError(f"target parameter-weighted sparsity must be in (0, 1), got {target!r}")


def _nll(model: nn.Module, rotations: Rotations, windows: torch.Tensor, sparsity: Sparsity, *, scope: str,
         score: str, batch_size: int, device: str | None) -> float:
    """Calibration NLL of ``sparsity``. A lazily loaded model's weights are not in memory
    (:func:`larosa.models.load_lazy`), so it is scored one layer at a time on ``device``; otherwise by whole-model
    forwards where it is."""
    if is_lazy(model):
        ppl = perplexity_streamed(model, windows, rotations=rotations, sparsity=sparsity, scope=scope, score=score,
                                  device=device, progress=False)["ppl"]
    else:
        sparsify(model, rotations, sparsity, scope=scope, score=score)
        try:
            ppl = perplexity(model, windows, batch_size=batch_size, progress=False)["ppl"]
        finally:
            unsparsify(model)
    return math.log(ppl)


@torch.no_grad()
def search_split(model: nn.Module, rotations: Rotations, windows: torch.Tensor, target: float, *,
                 scope: str = "block", score: str = "magnitude", grid=SPLIT_GRID, batch_size: int = 1,
                 device: str | None = None, progress: bool = True) -> dict:
    """The grid point with the lowest calibration NLL; {"config", "rotated_multiple", "trials"}."""
    _check_target(target)
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


GREEDY_STEP = 0.05  # a site's level rises by this much per greedy step


@torch.no_grad()
def greedy_plan(model: nn.Module, rotations: Rotations, windows: torch.Tensor, target: float, *,
                scope: str = "block", score: str = "magnitude", step: float = GREEDY_STEP,
                device: str | None = None, progress: bool = True) -> list[SparsityConfig]:
    """Per layer, the sites' levels that reach ``target`` with the least layer output error, raised greedily
    (:func:`larosa.layerwise.greedy_levels`) on the dense model's inputs to that layer; each layer visits
    ``device`` in turn (default: cuda when available), so a lazily loaded model works too."""
    _check_target(target)
    adapter = adapter_for(model)
    weights = adapter.dims.site_weights()
    qs = rotations.for_scope(scope)
    unsparsify(model)

    def choose(i, layer, call, values, inputs) -> dict:
        error = output_error(layer, call, inputs)
        handles = attach_sites(adapter, layer, SparsityConfig(0.0, 0.0, 0.0, 0.0),
                               *site_inputs(adapter, layer, rotations, qs[i], score))
        sites = layer.larosa_sites

        def trial_error(levels: dict[str, float]) -> float:
            for site, level in levels.items():
                sites[site].k = keep_count(level, sites[site].size)
            return error()

        try:
            return greedy_levels(weights, target, step, trial_error)
        finally:
            for h in handles:
                h.remove()
            del layer._modules["larosa_sites"]

    return [SparsityConfig(**levels) for levels in layerwise(model, windows, {}, choose, f"site search @ {target:.2f}",
                                                             device, progress)]


def search(model: nn.Module, rotations: Rotations, windows: torch.Tensor, target: float, *,
           scope: str = "block", score: str = "magnitude", layers: bool = True, batch_size: int = 1,
           device: str | None = None, progress: bool = True) -> dict:
    """Split search, then (with ``layers``) the per-layer greedy, kept if its calibration NLL is lower; a
    JSON-ready plan. ``device`` is where layers run one at a time (the greedy; every trial of a lazily loaded
    model); ``batch_size`` windows go through each whole-model forward of a model in memory."""
    start = time.perf_counter()
    split = search_split(model, rotations, windows, target, scope=scope, score=score, batch_size=batch_size,
                         device=device, progress=progress)
    n = adapter_for(model).dims.n_layers
    plan, chosen = [split["config"]] * n, "split"
    nll = {"split": min(t["nll"] for t in split["trials"])}
    if layers:
        greedy = greedy_plan(model, rotations, windows, target, scope=scope, score=score, device=device,
                             progress=progress)
        nll["per-layer"] = _nll(model, rotations, windows, greedy, scope=scope, score=score, batch_size=batch_size,
                                device=device)
        if nll["per-layer"] < nll["split"]:
            plan, chosen = greedy, "per-layer"
    return {
        "target": target, "scope": scope, "score": score, "signal": rotations.signal,
        "rotated_multiple": split["rotated_multiple"], "split_trials": split["trials"],
        "chosen": chosen, "nll": nll, "layers": [c.sites() for c in plan],
        "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
        "seconds": round(time.perf_counter() - start, 1),
    }


def plan_configs(plan: dict) -> list[SparsityConfig]:
    return [SparsityConfig(**sites) for sites in plan["layers"]]


def add_plan(rotations: Rotations, plan: dict) -> None:
    """Store a plan in the rotations' metadata, replacing one for the same target, scope and score."""
    plans = [p for p in stored_plans(rotations) if _key(p) != _key(plan)]
    rotations.meta["plans"] = json.dumps(plans + [plan])


def stored_plans(rotations: Rotations) -> list[dict]:
    try:
        plans = json.loads(rotations.meta.get("plans", "[]"))
    except json.JSONDecodeError as e:
        raise LarosaError(f"the rotations' search plans are not valid JSON: {e}") from e
    for p in plans:
        if not isinstance(p, dict) or len(p.get("layers", ())) != rotations.n_layers:
            raise LarosaError("a stored search plan does not have one entry per layer; re-run larosa search")
        if any(set(sites) != set(SITES) for sites in p["layers"]):
            raise LarosaError("a stored search plan lacks a site's sparsity; re-run larosa search")
    return plans


def find_plan(rotations: Rotations, target: float, scope: str, score: str) -> dict | None:
    return next((p for p in stored_plans(rotations) if _key(p) == _key(
        {"target": target, "scope": scope, "score": score})), None)


def _key(plan: dict) -> tuple:
    return round(plan["target"], 6), plan["scope"], plan["score"]
