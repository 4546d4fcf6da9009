"""A searched plan: per-layer site levels for a parameter-weighted target, with where they came from (the model,
the data and windows they were scored on, the scope and score they assume), saved as a JSON file of its own.

A plan file holds one or more plans; :func:`select` picks the one for a target. Rotations files of larosa 0.1
carried their plans in their metadata: :func:`load_plans` reads those too.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from torch import nn

from ..arch import adapter_for
from ..errors import LarosaError
from ..io import write_json
from ..rotations import SCOPES, SIGNALS, config_hash, weights_fingerprint
from ..version import __version__
from .levels import SCORES, SITES, SparsityConfig, check_target

FORMAT = "larosa-plans/1"


@dataclass(frozen=True)
class Plan:
    levels: tuple[SparsityConfig, ...]  # one per decoder layer
    target: float  # parameter-weighted
    scope: str
    score: str
    signal: str
    model: dict  # name, config_hash, weights_fingerprint of the model it was searched on
    data: str  # the text its candidates were fitted and scored on
    windows: int  # fitted on (the per-layer greedy)
    seq_len: int
    held_out: int = 0  # windows after those the candidates were scored on (0: scored on the fitting windows)
    chosen: str = "split"  # "default" (the fixed split), "split" (the grid's best split) or "per-layer"
    rotated_multiple: float | None = None  # the split's rotated-site level over the target
    nll: dict = field(default_factory=dict)  # calibration NLL of each candidate kind
    split_trials: list = field(default_factory=list)
    seconds: float = 0.0
    larosa_version: str = __version__

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "levels"}
        return {**d, "layers": [c.sites() for c in self.levels]}

    @classmethod
    def from_dict(cls, d: dict, where: object = "plan") -> Plan:
        if not isinstance(d, dict) or not isinstance(d.get("layers"), list) or not d["layers"]:
            raise LarosaError(f"{where}: a plan needs one entry per layer; re-run larosa search")
        if any(not isinstance(sites, dict) or set(sites) != set(SITES) for sites in d["layers"]):
            raise LarosaError(f"{where}: a plan lacks a site's sparsity; re-run larosa search")
        if d.get("scope") not in SCOPES or d.get("score") not in SCORES or d.get("signal") not in SIGNALS:
            raise LarosaError(f"{where}: a plan names no valid scope, score or signal; re-run larosa search")
        known = {f.name for f in fields(cls)}
        return cls(levels=tuple(SparsityConfig(**sites) for sites in d["layers"]), target=check_target(d["target"]),
                   **{k: v for k, v in d.items() if k in known and k not in ("levels", "target")})

    def check_model(self, model: nn.Module) -> None:
        """Raise unless this plan was searched on this architecture; warn if on other weights of it."""
        n_layers = adapter_for(model).dims.n_layers
        if self.model.get("config_hash") not in (None, config_hash(model.config)) or len(self.levels) != n_layers:
            raise LarosaError(f"this plan was searched on {self.model.get('name', '?')} ({len(self.levels)} layers), "
                              f"not on this model ({n_layers} layers); run larosa search on this model")
        if self.model.get("weights_fingerprint") not in (None, weights_fingerprint(model)):
            warnings.warn(f"this plan was searched on other weights of this architecture "
                          f"({self.model.get('name', '?')}); a search on this model's own may do better",
                          stacklevel=3)


def _key(plan: Plan) -> tuple:
    return round(plan.target, 6), plan.scope, plan.score


def merge(plans: Sequence[Plan], new: Sequence[Plan]) -> list[Plan]:
    """``plans`` with ``new`` added, each replacing any plan for the same target, scope and score."""
    keys = {_key(p) for p in new}
    return [p for p in plans if _key(p) not in keys] + list(new)


def save_plans(plans: Sequence[Plan], path: str | os.PathLike) -> None:
    write_json(path, {"format": FORMAT, "plans": [p.to_dict() for p in plans]})


def load_plans(path: str | os.PathLike) -> list[Plan]:
    """The plans of a plan file, or of a larosa 0.1 rotations file that carries them in its metadata."""
    path = Path(path)
    if not path.is_file():
        raise LarosaError(f"plan file not found: {path}")
    if path.suffix == ".safetensors":
        return _legacy_plans(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LarosaError(f"{path} is not a plan file (not JSON: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("plans"), list):
        raise LarosaError(f"{path} is not a larosa plan file (expected format {FORMAT}); make one with larosa search")
    return [Plan.from_dict(d, path) for d in doc["plans"]]


def _legacy_plans(path: Path) -> list[Plan]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise LarosaError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        raw = json.loads(meta.get("plans", "[]"))
    except json.JSONDecodeError as e:
        raise LarosaError(f"{path}: the rotations' search plans are not valid JSON: {e}") from e
    model = {"name": meta.get("model"), "config_hash": meta.get("config_hash"),
             "weights_fingerprint": meta.get("weights_fingerprint")}
    return [Plan.from_dict({"model": model, "data": "unrecorded (larosa 0.1)", "larosa_version": "0.1",
                            "signal": meta.get("signal"), **d}, path) for d in raw]


def select(plans: Sequence[Plan], target: float | None = None, scope: str | None = None, score: str | None = None,
           where: object = "the plan file") -> Plan:
    """The one plan for ``target`` (and ``scope``, ``score`` where given); any of them may be left out when the
    plans leave no choice."""
    found = [p for p in plans if (target is None or round(p.target, 6) == round(target, 6))
             and (scope is None or p.scope == scope) and (score is None or p.score == score)]
    if len(found) == 1:
        return found[0]
    have = ", ".join(f"target {p.target} ({p.scope} scope, {p.score} score)" for p in plans) or "no plans"
    asked = ", ".join(f"{k} {v}" for k, v in (("target", target), ("scope", scope), ("score", score)) if v is not None)
    if not found:
        raise LarosaError(f"{where} has no plan for {asked or 'this model'}; it has {have}")
    raise LarosaError(f"{where} has several plans ({have}); say which by target, scope or score")
