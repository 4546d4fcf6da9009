"""The one call: ``sparsify(model, config)`` applies a method to a model, with one config dataclass per method
(:class:`LaRoSaConfig`, :class:`TealConfig`, :class:`CatsConfig`); :func:`describe` says what a model carries."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .arch import adapter_for
from .errors import LarosaError
from .fold import FoldedSettings, fold, rotated, weight_scaled
from .sparsity import LABELS, sites
from .sparsity.levels import adapter_overhead, report
from .sparsity.peers import CatsConfig, TealConfig, cats, teal
from .sparsity.topk import (LaRoSaConfig, calibrate_offsets, calibrate_thresholds, settings, simulate,
                            use_thresholds)

Config = LaRoSaConfig | TealConfig | CatsConfig


def sparsify(model: nn.Module, config: Config, *, device: str | None = None, progress: bool = True) -> nn.Module:
    """Apply ``config``'s method to ``model`` and return the sparse model.

    LaRoSa in simulate mode, TEAL and CATS change ``model`` in place (a method applied before is replaced);
    :func:`unsparsify` undoes them. LaRoSa in folded mode or with greedy selection (TEAL's thresholds on the
    globally rotated model), and TEAL with rotations, return a new model made from
    ``model``'s weights, which are consumed; TEAL with weight-aware scores rescales ``model``'s weights in place
    (the same function). TEAL, CATS and LaRoSa's threshold selection calibrate their
    thresholds layer by layer on ``device``.
    """
    if isinstance(config, LaRoSaConfig) and config.select == "greedy":
        config = TealConfig(config.target, config.calib, greedy=True, centre=config.centre or "median",
                            rotations=config.rotations, score=config.score or "weight")
    if isinstance(config, LaRoSaConfig):
        sparse = fold(model, config) if config.mode == "folded" else simulate(model, config)
        sites.settings(sparse)["source"] = config.source
        if config.centre:
            calibrate_offsets(sparse, config.calib, config.centre, device=device, progress=progress)
            _save_settings(sparse, centre=config.centre)
        if config.select == "threshold" and config.thresholds is None:
            select_by_thresholds(sparse, config.calib, device=device, progress=progress)
        return sparse
    if isinstance(config, TealConfig):
        if config.rotations is not None:
            model = rotated(model, config.rotations)
        if config.score == "weight":
            weight_scaled(model)
        teal(model, config, device=device, progress=progress)
        return model
    if isinstance(config, CatsConfig):
        cats(model, config, device=device, progress=progress)
        return model
    raise LarosaError(f"unknown method config {type(config).__name__}; give a LaRoSaConfig, TealConfig or CatsConfig")


def select_by_thresholds(model: nn.Module, calib, *, device: str | None = None, progress: bool = True) -> None:
    """Switch a LaRoSa model (simulated or folded; a folded one saves them) from exact Top-K to thresholds
    calibrated on ``calib`` ([n, seq_len] token ids)."""
    thresholds = calibrate_thresholds(model, calib, device=device, progress=progress)
    use_thresholds(model, thresholds)
    _save_settings(model, select="threshold", thresholds=tuple(thresholds))


def _save_settings(model: nn.Module, **changes) -> None:
    """What calibration on the sparse model changed, into a folded model's config (saved with it)."""
    folded = FoldedSettings.of(model.config)
    if folded is not None:
        model.config.larosa = replace(folded, **changes).to_dict()


def unsparsify(model: nn.Module) -> nn.Module:
    """Remove what :func:`sparsify` added in place; the model is dense again."""
    return sites.remove(model)


def describe(model: nn.Module, config: LaRoSaConfig | None = None) -> dict:
    """The method ``model`` carries and the sparsity it was configured for (measured sparsity comes from
    evaluation); with ``config``, what that LaRoSa config would give ``model`` (a model scored layer by layer,
    which carries nothing itself)."""
    dims = adapter_for(model).dims
    state = settings(config, config.levels(dims)) if config is not None else sites.settings(model)
    if state is None:
        return {"method": "dense", "label": LABELS["dense"], "mode": "dense", **report(None, dims),
                "sparsity_source": None, "scope": None, "signal": None, "score": None, "head_rotation": False,
                "select": None, "form": None, "centre": None, "adapter_overhead": 0.0}
    if state["method"] != "larosa":  # a peer: thresholds calibrated for a parameter-weighted target
        # TEAL on LaRoSa's global rotation, centred, weight-aware
        rotated, centre, score = state.get("rotated"), state.get("centre"), state.get("score")
        base = LABELS[state["method"]]
        base = f"LaRoSa {rotated} rotation + {base} thresholds" if rotated else base
        label = base + (", centred" if centre else "") + (", weight-aware" if score == "weight" else "")
        return {"method": state["method"], "label": label, "mode": "simulate",
                "nominal_sparsity": None, "param_weighted_sparsity": state["target"], "configured_site_sparsity": {},
                "sparsity_source": state["method"], "scope": rotated, "signal": None, "score": score,
                "head_rotation": False, "select": "threshold", "form": None, "centre": centre, "adapter_overhead": 0.0}
    scope = state["scope"]
    select = "thresholds" if state["select"] == "threshold" else "exact Top-K"
    label = f"{LABELS['larosa']} {state['mode']}, {scope} scope, {select}"
    return {"method": "larosa", "label": label, "mode": state["mode"], **report(state["levels"], dims),
            "sparsity_source": state["source"], "scope": scope, "signal": state["signal"], "score": state["score"],
            "head_rotation": state["head_rotation"], "select": state["select"], "form": state["form"],
            "centre": state["centre"],
            "adapter_overhead": adapter_overhead(dims, scope, state["form"]) if state["mode"] == "folded" else 0.0}
