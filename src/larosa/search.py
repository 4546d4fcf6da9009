"""LaRoSa's free parameters, searched on calibration data instead of hard-coded.

Two searches, each holding the model's parameter-weighted sparsity (the share of decoder weight reads skipped) at
the target:

- the split (the paper's Algorithm 1): a grid over how much sparsity the rotated sites (attention and MLP inputs)
  take against the plain ones (o_proj and down_proj inputs), scored by calibration NLL. The reference code fixes
  it at 0.8 / 1.2.
- the per-layer allocation: every layer's sites scaled by a factor f_l, with mean f_l = 1 so the target holds.
  Each layer's cost at each factor is the calibration NLL with that layer alone moved off the split; layers are
  then raised greedily by the least NLL added per step.

A plan is a list of per-layer :class:`SparsityConfig`; it is stored in the rotations file and used by eval and
sparsify.
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
from .evaluate import perplexity
from .rotations import Rotations
from .sparsify import DEFAULT_SPLIT, SITES, SparsityConfig, sparsify, unsparsify

SPLIT_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)  # rotated-site level as a multiple of the target
LAYER_FACTORS = tuple(round(0.5 + 0.1 * i, 1) for i in range(11))  # 0.5 ... 1.5
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


@torch.no_grad()
def search_split(model: nn.Module, rotations: Rotations, windows: torch.Tensor, target: float, *,
                 scope: str = "block", score: str = "magnitude", grid=SPLIT_GRID, batch_size: int = 1,
                 progress: bool = True) -> dict:
    """The grid point with the lowest calibration NLL; {"config", "rotated_multiple", "trials"}."""
    _check_target(target)
    dims = adapter_for(model).dims
    trials = []
    for m in tqdm(grid, desc=f"split search @ {target:.2f}", disable=not progress):
        config = config_for_target(dims, target, m)
        if config is None:
            continue
        sparsify(model, rotations, config, scope=scope, score=score)
        nll = math.log(perplexity(model, windows, batch_size=batch_size, progress=False)["ppl"])
        unsparsify(model)
        trials.append({"rotated_multiple": m, "sites": config.sites(), "nll": nll})
    if not trials:
        raise LarosaError(f"no split of the grid reaches parameter-weighted sparsity {target}")
    best = min(trials, key=lambda t: t["nll"])
    return {"config": SparsityConfig(**best["sites"]), "rotated_multiple": best["rotated_multiple"],
            "trials": trials}


@torch.no_grad()
def layer_costs(model: nn.Module, rotations: Rotations, windows: torch.Tensor, base: SparsityConfig, *,
                scope: str = "block", score: str = "magnitude", factors=LAYER_FACTORS, batch_size: int = 1,
                progress: bool = True) -> list[list[float]]:
    """costs[l][j]: calibration NLL with layer l's sites at ``factors[j] * base`` and every other layer at
    ``base`` (inf where a site would reach 1).

    The loss itself, not a layer's output error: relative output errors are small wherever the residual stream is
    large (the middle layers of Llama-style models), and allocating by them piled sparsity there and raised PPL.
    """
    n = adapter_for(model).dims.n_layers
    costs = []
    for i in tqdm(range(n), desc="layer sensitivity", unit="layer", disable=not progress):
        row = []
        for f in factors:
            levels = {s: v * f for s, v in base.sites().items()}
            if max(levels.values()) >= 1:
                row.append(math.inf)
                continue
            plan = [base] * n
            plan[i] = SparsityConfig(**levels)
            sparsify(model, rotations, plan, scope=scope, score=score)
            row.append(math.log(perplexity(model, windows, batch_size=batch_size, progress=False)["ppl"]))
        costs.append(row)
    unsparsify(model)
    return costs


def allocate(costs: list[list[float]], factors=LAYER_FACTORS) -> list[float]:
    """Per-layer factors with mean exactly 1 (so the target holds), raised greedily from the smallest factor by
    the least cost added per step (costs taken as additive over layers)."""
    n, lo = len(costs), 0
    step = factors[1] - factors[0]
    chosen = [lo] * n
    steps = round(n * (1 - factors[lo]) / step)
    for _ in range(steps):
        cost = [costs[i][j + 1] - costs[i][j] if j + 1 < len(factors) else math.inf for i, j in enumerate(chosen)]
        i = min(range(n), key=cost.__getitem__)
        if math.isinf(cost[i]) or math.isnan(cost[i]):
            raise LarosaError("no per-layer allocation reaches the target within the factor grid")
        chosen[i] += 1
    return [factors[j] for j in chosen]


def search(model: nn.Module, rotations: Rotations, windows: torch.Tensor, target: float, *,
           scope: str = "block", score: str = "magnitude", layers: bool = True, batch_size: int = 1,
           progress: bool = True) -> dict:
    """Split search, then (with ``layers``) the per-layer allocation on top of it; a JSON-ready plan."""
    start = time.perf_counter()
    split = search_split(model, rotations, windows, target, scope=scope, score=score, batch_size=batch_size,
                         progress=progress)
    base = split["config"]
    factors = [1.0] * adapter_for(model).dims.n_layers
    if layers:
        factors = allocate(layer_costs(model, rotations, windows, base, scope=scope, score=score,
                                       batch_size=batch_size, progress=progress))
    plan = [SparsityConfig(**{s: v * f for s, v in base.sites().items()}) for f in factors]
    return {
        "target": target, "scope": scope, "score": score, "signal": rotations.signal,
        "rotated_multiple": split["rotated_multiple"], "split_trials": split["trials"],
        "layer_factors": factors, "layers": [c.sites() for c in plan],
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
