"""How sparse each site is, and what that costs: the site table, per-site levels, parameter-weighted sparsity,
and the ways a parameter-weighted target becomes site levels (a fixed split, or a greedy allocation).

Four Top-K sites per decoder layer feed the seven projections (docs/method.md, sparsity accounting):
``attn_in`` feeds q, k, v; ``o_in`` o_proj; ``mlp_in`` gate and up; ``down_in`` down_proj.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from ..arch import Dims
from ..errors import LarosaError

SITES = ("attn_in", "o_in", "mlp_in", "down_in")
ROTATED, PLAIN = ("attn_in", "mlp_in"), ("o_in", "down_in")
# The reference code's split of a nominal sparsity s: 0.8 s where the input is rotated, 1.2 s where it is not.
DEFAULT_SPLIT = (0.8, 1.2)
# What Top-K ranks: |x|, or |x| times the norm of the weight row each entry multiplies (weight-aware).
SCORES = ("magnitude", "weight")
MAX_SITE = 0.99  # a greedy allocation leaves at least 1 % of every site's input


def site_sizes(dims: Dims) -> dict[str, int]:
    """Entries of each site's input per token."""
    return {"attn_in": dims.hidden, "o_in": dims.q, "mlp_in": dims.hidden, "down_in": dims.intermediate}


def site_weights(dims: Dims) -> dict[str, int]:
    """Weights each site feeds in one layer: what its zeros save in reads."""
    d, i = dims.hidden, dims.intermediate
    return {"attn_in": d * (dims.q + 2 * dims.kv), "o_in": dims.q * d, "mlp_in": 2 * d * i, "down_in": i * d}


# How a folded model carries the rotations: in the residual stream (d x d adapters where the basis changes) or as a
# d x d transform of each block's normed input (the residual stays in the model's basis; any Q, with its gain).
FORMS = ("residual", "input")


def adapter_overhead(dims: Dims, scope: str | None, form: str = "residual") -> float:
    """The folded layer's dense d x d matrices (adapters or input transforms, read whole) over its linear weights."""
    matrices = 2 if form == "input" and scope else {None: 0, "global": 0, "layer": 1, "block": 2}[scope]
    return matrices * dims.hidden**2 / sum(site_weights(dims).values())


def check_level(value: object, what: str) -> float:
    """A sparsity level: a real number in [0, 1)."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise LarosaError(f"{what} must be in [0, 1), got {value!r}")
    return float(value)


def check_target(target: object) -> float:
    return check_level(target, "target parameter-weighted sparsity")


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
            check_level(getattr(self, site), f"sparsity at {site}")

    @classmethod
    def from_nominal(cls, s: float, split: tuple[float, float] = DEFAULT_SPLIT) -> SparsityConfig:
        check_level(s, "sparsity")
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
        weights = site_weights(dims)
        return sum(self.sites()[s] * w for s, w in weights.items()) / sum(weights.values())

    def to_dict(self) -> dict:
        return asdict(self)


Sparsity = float | SparsityConfig | Sequence[SparsityConfig]


def keep_count(sparsity: float, size: int) -> int:
    """k = round((1 - s) d), at least one entry."""
    return max(1, math.floor((1.0 - sparsity) * size + 0.5))


def per_layer(sparsity: Sparsity, n_layers: int) -> list[SparsityConfig]:
    """One config per layer from a nominal level, one config for all layers, or a per-layer plan."""
    if isinstance(sparsity, SparsityConfig):
        return [sparsity] * n_layers
    if isinstance(sparsity, Sequence):
        if len(sparsity) != n_layers or not all(isinstance(c, SparsityConfig) for c in sparsity):
            raise LarosaError(f"a per-layer plan needs {n_layers} SparsityConfig, got {len(sparsity)} entries")
        return list(sparsity)
    return [SparsityConfig.from_nominal(sparsity)] * n_layers


def param_weighted(configs: Sequence[SparsityConfig], dims: Dims) -> float:
    """Layers are the same size, so the model's parameter-weighted sparsity is the mean of the layers'."""
    return sum(c.param_weighted(dims) for c in configs) / len(configs)


def report(configs: Sequence[SparsityConfig] | None, dims: Dims) -> dict:
    """The configured sparsity, as every command reports it."""
    if not configs:
        return {"nominal_sparsity": 0.0, "param_weighted_sparsity": 0.0, "configured_site_sparsity": {}}
    return {"nominal_sparsity": configs[0].nominal if len(set(configs)) == 1 else None,
            "param_weighted_sparsity": param_weighted(configs, dims),
            "configured_site_sparsity": {s: sum(c.sites()[s] for c in configs) / len(configs) for s in SITES}}


# -- a parameter-weighted target to site levels ------------------------------------------------------------
def config_for_target(dims: Dims, target: float, rotated_multiple: float) -> SparsityConfig | None:
    """Rotated sites at ``rotated_multiple * target``, plain sites at what makes the parameter-weighted
    sparsity equal ``target``; None where that needs a level outside [0, 1)."""
    w = site_weights(dims)
    rotated_w, plain_w = sum(w[s] for s in ROTATED), sum(w[s] for s in PLAIN)
    r = rotated_multiple * target
    p = (target * (rotated_w + plain_w) - r * rotated_w) / plain_w
    if not (0 <= r < 1 and 0 <= p < 1):
        return None
    return SparsityConfig(attn_in=r, o_in=p, mlp_in=r, down_in=p)


def default_config(dims: Dims, target: float, split: tuple[float, float] = DEFAULT_SPLIT) -> SparsityConfig:
    """The fixed split at the nominal level whose parameter-weighted sparsity is ``target``."""
    check_target(target)
    w = site_weights(dims)
    per_unit = (split[0] * sum(w[s] for s in ROTATED) + split[1] * sum(w[s] for s in PLAIN)) / sum(w.values())
    if not (all(math.isfinite(m) and m >= 0 for m in split) and per_unit > 0):
        raise LarosaError(f"a split is two multipliers >= 0, not both 0; got {split[0]},{split[1]}")
    nominal = target / per_unit
    if nominal >= 1.0 or max(split) * nominal >= 1.0:
        raise LarosaError(f"target {target} is out of reach of split {split[0]},{split[1]}: it needs nominal "
                          f"sparsity {nominal:.3f}, {max(split) * nominal:.3f} at a site; this split reaches targets "
                          f"below {per_unit / max(1.0, *split):.3f} (use another --split, or a plan from larosa "
                          "search)")
    return SparsityConfig.from_nominal(nominal, split)


def greedy_levels(weights: dict[str, int], target: float, step: float, error: Callable[[dict[str, float]], float],
                  max_level: float = MAX_SITE) -> dict[str, float]:
    """From all-dense, repeatedly raise by ``step`` the site whose raise adds the least ``error`` per weight read
    skipped, until the parameter-weighted sparsity sum(level * weights) / sum(weights) is ``target`` (the last
    raise is partial, so it lands on it). TEAL's block-wise greedy allocation, for any set of sites.

    The cost is per weight skipped because sites differ in size: an unnormalised comparison would favour the
    small sites for saving little.
    """
    goal = target * sum(weights.values())
    levels = dict.fromkeys(weights, 0.0)
    current = error(levels)
    while (missing := goal - sum(levels[s] * weights[s] for s in weights)) > 1e-9 * goal:
        best = None
        for s in weights:
            raise_by = min(step, max_level - levels[s], missing / weights[s])
            if raise_by <= 1e-12:
                continue
            trial = {**levels, s: levels[s] + raise_by}
            e = error(trial)
            cost = (e - current) / (raise_by * weights[s])
            if best is None or cost < best[0]:
                best = (cost, e, trial)
        if best is None:
            raise LarosaError(f"sites capped at {max_level} cannot reach parameter-weighted sparsity {target}")
        _, current, levels = best
    return levels
