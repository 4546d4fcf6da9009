"""Methods side by side on one model and the same windows, at equal parameter-weighted sparsity.

Nominal levels mean different things per method (TEAL's s is every projection's, LaRoSa's is split 0.8 / 1.2,
CATS touches the MLP only), so every method is asked for the same share of decoder weight reads skipped, and the
share each one actually skipped on the evaluation windows is measured and reported beside its perplexity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import peers
from .adapters import adapter_for
from .calibrate import calibrate
from .errors import LarosaError
from .evaluate import perplexity
from .rotations import Rotations
from .search import add_plan, default_config, find_plan, plan_configs, search
from .sparsify import sparsify, unsparsify

METHODS = ("dense", "teal", "teal-greedy", "cats", "larosa", "larosa-searched", "larosa-searched-wa")
LABELS = {
    "dense": "dense", "teal": "TEAL uniform", "teal-greedy": "TEAL greedy", "cats": "CATS",
    "larosa": "LaRoSa, 0.8 / 1.2 split", "larosa-searched": "LaRoSa, searched",
    "larosa-searched-wa": "LaRoSa, searched + weight-aware",
}


def check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LarosaError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")


def _apply(model: nn.Module, method: str, target: float, rotations: Rotations | None, calib: torch.Tensor,
           search_windows: torch.Tensor, scope: str, device: str | None, batch_size: int) -> dict:
    """Make ``model`` sparse by ``method`` in place; returns what was chosen (thresholds, plan, ...)."""
    if method in ("teal", "teal-greedy"):
        return peers.teal(model, calib, target, greedy=method == "teal-greedy", device=device, progress=False)
    if method == "cats":
        return peers.cats(model, calib, target, device=device, progress=False)
    if method == "larosa":
        config = default_config(adapter_for(model).dims, target)
        sparsify(model, rotations, config, scope=scope)
        return {"sites": config.sites(), "nominal": config.nominal}
    score = "weight" if method == "larosa-searched-wa" else "magnitude"
    plan = find_plan(rotations, target, scope, score)
    if plan is None:
        plan = search(model, rotations, search_windows, target, scope=scope, score=score, batch_size=batch_size,
                      device=device, progress=False)
        add_plan(rotations, plan)
    sparsify(model, rotations, plan_configs(plan), scope=scope, score=score)
    return {k: plan[k] for k in ("rotated_multiple", "chosen", "nll", "seconds")}


def compare(model: nn.Module, methods: list[str], targets: list[float], *, calib: torch.Tensor,
            search_windows: torch.Tensor, windows: torch.Tensor, rotations: Rotations | None = None,
            scope: str = "block", device: str | None = None, batch_size: int = 1, done: list[dict] = (),
            on_row: Callable[[dict], None] | None = None, progress: bool = True) -> dict:
    """One perplexity per (method, target); ``rotations`` gains the search plans it did not have.

    Rows in ``done`` (from an interrupted run with the same settings) are kept instead of run again;
    ``on_row(result so far)`` is called after each new row, so a caller can save partial results.
    """
    check_methods(methods)
    start = time.perf_counter()
    if rotations is None and any(m.startswith("larosa") for m in methods):
        rotations = calibrate(model, calib, device=device, progress=progress)
    runs = [(m, t) for m in methods for t in ([0.0] if m == "dense" else targets)]
    finished = {(r["method"], r["target"]): r for r in done}
    rows = []
    result = {"methods": methods, "targets": targets, "scope": scope, "rows": rows, "rotations": rotations,
              "seconds": 0.0}
    for method, target in tqdm(runs, desc="compare", unit="run", disable=not progress):
        if (method, target) in finished:
            rows.append(finished[(method, target)])
            continue
        row = {"method": method, "label": LABELS[method], "target": target}
        try:
            setup = time.perf_counter()
            row["settings"] = {} if method == "dense" else _apply(
                model, method, target, rotations, calib, search_windows, scope, device, batch_size)
            row["setup_seconds"] = round(time.perf_counter() - setup, 1)
            row.update(perplexity(model, windows, batch_size=batch_size, progress=False))
        except LarosaError as e:  # an unreachable target (CATS past the MLP's share): reported, not fatal
            row["error"] = str(e)
        finally:
            if getattr(model, "larosa", None) is not None:
                unsparsify(model)
        rows.append(row)
        result["seconds"] = round(time.perf_counter() - start, 1)
        if on_row is not None:
            on_row(result)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def table(result: dict) -> str:
    """Markdown: a row per method, a column per target; each cell PPL (measured parameter-weighted sparsity)."""
    targets = result["targets"]
    lines = ["| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |", "|---|" + "---:|" * len(targets)]
    for method in result["methods"]:
        cells = []
        for t in [0.0] if method == "dense" else targets:
            row = next((r for r in result["rows"] if r["method"] == method and r["target"] == t), None)
            cells.append("not run yet" if row is None else f"n/a ({row['error'][:60]})" if "error" in row else
                         f"{row['ppl']:.3f} ({row['measured_param_weighted']:.3f})")
        if method == "dense":
            cells = cells * len(targets)
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str | Path, cap: float = 2.0) -> None:
    """PPL against measured parameter-weighted sparsity, a line per method, dense as a dashed level. Points above
    ``cap`` x dense are drawn on the top edge with their value, so one collapsed method does not flatten the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    measured = [r for r in result["rows"] if "ppl" in r]
    dense = next((r["ppl"] for r in measured if r["method"] == "dense"), None)
    top = min(max(r["ppl"] for r in measured), cap * dense) if dense else max(r["ppl"] for r in measured)
    for method in result["methods"]:
        rows = [r for r in measured if r["method"] == method]
        if method == "dense" and rows:
            ax.axhline(rows[0]["ppl"], color="gray", linestyle="--", label="dense")
        elif rows:
            x = [r["measured_param_weighted"] for r in rows]
            line, = ax.plot(x, [min(r["ppl"], top) for r in rows], marker="o", label=LABELS[method])
            for xi, r in zip(x, rows):
                if r["ppl"] > top:
                    ax.annotate(f"{r['ppl']:.0f}", (xi, top), textcoords="offset points", xytext=(0, -12),
                                ha="center", fontsize=7, color=line.get_color())
    ax.set_xlabel("parameter-weighted sparsity (measured)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
