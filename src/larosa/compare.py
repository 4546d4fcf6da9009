"""Methods side by side on one model and the same windows, at equal parameter-weighted sparsity.

Nominal levels mean different things per method (TEAL's s is every projection's, LaRoSa's is split 0.8 / 1.2,
CATS touches the MLP only), so every method is asked for the same share of decoder weight reads skipped, and the
share each one actually skipped on the evaluation windows is measured and reported beside its perplexity.

A comparison written to a directory resumes there: finished runs, the rotations and the searched plans are kept,
so a run cut short by a time limit loses at most the run in flight.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .api import sparsify, unsparsify
from .arch import adapter_for
from .calibrate import calibrate
from .data import token_windows
from .errors import LarosaError
from .eval import perplexity
from .io import atomic_file, deliver, write_report
from .models import DTYPES, load_model
from .rotations import Rotations
from .search import search
from .sparsity import LABELS, sites
from .sparsity.levels import adapter_overhead, default_config
from .sparsity.peers import CatsConfig, TealConfig
from .sparsity.plan import Plan, load_plans, merge, save_plans
from .sparsity.topk import LaRoSaConfig

# The rows a comparison can have: the methods, and LaRoSa with its split searched (and weight-aware scores).
# LaRoSa's rows: how each one differs from the fixed 0.8 / 1.2 split with exact Top-K and magnitude scores.
VARIANTS = {
    "larosa": ("LaRoSa, 0.8 / 1.2 split", {}),
    "larosa-searched": ("LaRoSa, searched", {"search": True}),
    "larosa-searched-wa": ("LaRoSa, searched + weight-aware", {"search": True, "score": "weight"}),
    "larosa-threshold": ("LaRoSa, thresholds", {"select": "threshold"}),
    "larosa-searched-threshold": ("LaRoSa, searched + thresholds", {"search": True, "select": "threshold"}),
    "larosa-centred": ("LaRoSa, centred", {"centre": "median"}),
    "larosa-centred-threshold": ("LaRoSa, centred + thresholds", {"centre": "median", "select": "threshold"}),
    "larosa-searched-wa-threshold": ("LaRoSa, searched + weight-aware + thresholds",
                                     {"search": True, "score": "weight", "select": "threshold"}),
    "larosa-searched-centred-threshold": ("LaRoSa, searched + centred + thresholds",
                                          {"search": True, "centre": "median", "select": "threshold"}),
}
# LaRoSa's greedy selection (sparsify's default): TEAL's greedy thresholds, centred and weight-aware, on the model
# in the basis of the global gain-free Q (no adapters): a new model each time.
GREEDY = "larosa-greedy"
ROWS = {**{m: LABELS[m] for m in ("dense", "teal", "teal-greedy", "cats")},
        GREEDY: "LaRoSa greedy (sparsify's default): global rotation, centred, weight-aware",
        **{name: label for name, (label, _) in VARIANTS.items()}}
DEFAULT_ROWS = ("dense", "teal", "teal-greedy", "cats", GREEDY, "larosa", "larosa-searched", "larosa-searched-wa")


def check_rows(rows: list[str]) -> None:
    unknown = [m for m in rows if m not in ROWS]
    if unknown:
        raise LarosaError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")


def _apply(model: nn.Module, method: str, target: float, rotations: Rotations | None, calib: torch.Tensor,
           search_windows: tuple[torch.Tensor, torch.Tensor | None], scope: str, device: str | None, batch_size: int,
           plans: list[Plan], gainfree: Callable[[], Rotations]) -> tuple[nn.Module, dict]:
    """The model to score for ``method`` (``model`` made sparse in place, or for the greedy row a rotated copy:
    ``gainfree()`` gives its Q) and what was chosen (thresholds, plan, ...). Plans it searches are added to
    ``plans``."""
    if method == GREEDY:
        greedy = LaRoSaConfig(gainfree(), target=target, select="greedy", calib=calib)
        copied = sparsify(copy.deepcopy(model), greedy, device=device, progress=False)
        return copied, sites.settings(copied)
    if method in ("teal", "teal-greedy"):
        sparsify(model, TealConfig(target, calib, greedy=method == "teal-greedy"), device=device, progress=False)
        return model, sites.settings(model)
    if method == "cats":
        sparsify(model, CatsConfig(target, calib), device=device, progress=False)
        return model, sites.settings(model)
    options = dict(VARIANTS[method][1])
    score = options.pop("score", "magnitude")
    calibrated = {"calib": calib} if options.get("select") or options.get("centre") else {}
    if not options.pop("search", False):
        config = default_config(adapter_for(model).dims, target)
        sparsify(model, LaRoSaConfig(rotations, sparsity=config, scope=scope, score=score, **options, **calibrated),
                 device=device, progress=False)
        return model, {"sites": config.sites(), "nominal": config.nominal, **options}
    found = [p for p in plans if round(p.target, 6) == round(target, 6) and p.scope == scope and p.score == score]
    fit, held_out = search_windows
    plan = found[0] if found else search(model, rotations, fit, target, held_out=held_out, scope=scope, score=score,
                                         batch_size=batch_size, device=device, progress=False)
    if not found:
        plans[:] = merge(plans, [plan])
    sparsify(model, LaRoSaConfig(rotations, plan=plan, **options, **calibrated), device=device, progress=False)
    return model, {"rotated_multiple": plan.rotated_multiple, "chosen": plan.chosen, "nll": plan.nll,
            "seconds": plan.seconds, **options}


def compare(model: nn.Module, methods: list[str], targets: list[float], *, calib: torch.Tensor,
            search_windows: tuple[torch.Tensor, torch.Tensor | None], windows: torch.Tensor,
            rotations: Rotations | None = None,
            plans: list[Plan] | None = None, scope: str = "block", device: str | None = None, batch_size: int = 1,
            done: list[dict] = (), on_row: Callable[[dict], None] | None = None, progress: bool = True) -> dict:
    """One perplexity per (method, target); ``plans`` gains the plans searched on the way, fitted on
    ``search_windows[0]`` and scored on ``search_windows[1]``.

    Rows in ``done`` (from an interrupted run with the same settings) are kept instead of run again;
    ``on_row(result so far)`` is called after each new row, so a caller can save partial results.
    """
    check_rows(methods)
    start = time.perf_counter()
    adapter = adapter_for(model)
    dims = adapter.dims
    if rotations is None and any(m.startswith("larosa") for m in methods):
        rotations = calibrate(model, calib, device=device, progress=progress)
    plans = [] if plans is None else plans

    @functools.cache
    def gainfree() -> Rotations:  # the greedy row's Q: gain-free, as its measured rows used
        if rotations is not None and rotations.signal == "gainfree":
            return rotations
        return calibrate(model, calib, signal="gainfree", device=device, progress=progress)

    runs = [(m, t) for m in methods for t in ([0.0] if m == "dense" else targets)]
    finished = {(r["method"], r["target"]): r for r in done}
    rows = []
    result = {"methods": methods, "targets": targets, "scope": scope, "rows": rows, "rotations": rotations,
              "plans": plans, "seconds": 0.0}
    for method, target in tqdm(runs, desc="compare", unit="run", disable=not progress):
        if (method, target) in finished:
            rows.append(finished[(method, target)])
            continue
        row = {"method": method, "label": ROWS[method], "target": target}
        try:
            setup = time.perf_counter()
            evaluated, row["settings"] = (model, {}) if method == "dense" else _apply(
                model, method, target, rotations, calib, search_windows, scope, device, batch_size, plans, gainfree)
        except LarosaError as e:  # an unreachable target (CATS past the MLP's share): reported, not fatal
            row["error"] = str(e)
        else:  # a failing evaluation (a model giving NaN) is fatal
            row["setup_seconds"] = round(time.perf_counter() - setup, 1)
            row.update(perplexity(evaluated, windows, batch_size=batch_size, progress=False))
            row["relative_bytes"] = relative_bytes(row, dims, scope, rotations, adapter.rotatable_residual)
        finally:
            unsparsify(model)
        rows.append(row)
        result["seconds"] = round(time.perf_counter() - start, 1)
        if on_row is not None:
            on_row(result)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def relative_bytes(row: dict, dims, scope: str, rotations: Rotations | None, rotatable_residual: bool = True) -> float:
    """Decoder weight bytes a token reads, over the dense model's: the share the row's sites did not skip, plus,
    for LaRoSa, the dense d x d matrices of the cheapest folded form that computes what it simulated (residual
    adapters for Q of the gain-free signal where the family's residual stream can be rotated, else the input form's
    two transforms); the greedy row is a plain model in the global basis, with none."""
    read = 1.0 - row["measured_param_weighted"]
    if not row["method"].startswith("larosa") or row["method"] == GREEDY or rotations is None:
        return read
    residual = rotatable_residual and rotations.signal == "gainfree"
    return read + adapter_overhead(dims, scope, "residual" if residual else "input")


@dataclass(frozen=True)
class Comparison:
    """What a comparison is run on; a directory holding one with other settings is not resumed into."""

    model: str
    data: str
    calib_data: str
    dtype: str | None = None  # a key of larosa.models.DTYPES; None: the device's default
    windows: int = 40
    seq_len: int = 2048
    calib_windows: int = 16
    search_windows: int = 4  # calibration windows after calib_windows the search's greedy is fitted on
    held_out_windows: int = 8  # windows after those the search scores its candidates on
    scope: str = "block"
    rotations: str | None = None  # a rotations file; None: calibrate on calib_data
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_ROWS))
    targets: list[float] = field(default_factory=lambda: [0.25, 0.4, 0.5])

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("methods", "targets")}


def _resume(spec: Comparison, out: Path | None) -> tuple[list[dict], list[str], list[float], str | None, list[Plan]]:
    """(finished rows, methods, targets, rotations file, plans) to continue a comparison in ``out`` with: the
    methods and targets it had are kept, never dropped."""
    methods, targets = list(spec.methods), list(spec.targets)
    if out is None or not (out / "compare.json").exists():
        return [], methods, targets, spec.rotations, []
    try:
        previous = json.loads((out / "compare.json").read_text())
        done = previous["rows"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LarosaError(f"{out / 'compare.json'} is not a larosa comparison ({e}); delete it or pick another "
                          "--out") from e
    changed = [k for k, v in spec.settings().items() if previous.get(k) != v]
    if changed:
        raise LarosaError(f"{out} holds a comparison with other settings ({', '.join(changed)}); delete it or pick "
                          "another --out")
    methods += [m for m in previous.get("methods", []) if m not in methods]
    targets = sorted(set(targets) | set(previous.get("targets", [])))
    rotations = str(out / "rotations.safetensors") if (out / "rotations.safetensors").exists() else spec.rotations
    plans = load_plans(out / "plans.json") if (out / "plans.json").exists() else []
    return done, methods, targets, rotations, plans


def run(spec: Comparison, out: str | Path | None = None, *, device: str | None = None, batch_size: int = 1,
        progress: bool = True) -> dict:
    """Load the model, compare, and (with ``out``) write compare.json / .md / .png, the rotations and the searched
    plans there after every run, resuming a comparison ``out`` already holds."""
    check_rows(spec.methods)
    out = Path(out) if out is not None else None
    done, methods, targets, rotations_path, plans = _resume(spec, out)
    if done and progress:
        tqdm.write(f"resuming {out}: {len(done)} finished run(s) kept")
    rotations = Rotations.load(rotations_path) if rotations_path else None
    model, tok = load_model(spec.model, device=device, dtype=DTYPES[spec.dtype] if spec.dtype else None)
    text = token_windows(tok, spec.calib_data, spec.calib_windows + spec.search_windows + spec.held_out_windows,
                         spec.seq_len)
    calib, fit = text[: spec.calib_windows], text[spec.calib_windows : spec.calib_windows + spec.search_windows]
    held_out = text[spec.calib_windows + spec.search_windows:] if spec.held_out_windows else None

    def save(result: dict) -> dict:
        report = {k: v for k, v in result.items() if k not in ("rotations", "plans")} | spec.settings()
        report["table"] = table(report)

        def write(where: Path) -> None:  # a directory the comparison resumes from
            where.mkdir(parents=True, exist_ok=True)
            if result["rotations"] is not None:
                result["rotations"].save(where / "rotations.safetensors")
            if result["plans"]:
                save_plans(result["plans"], where / "plans.json")
            write_report(where, "compare", report, report["table"])

        if out is not None:
            deliver(out, write)
        return report

    result = compare(model, methods, targets, calib=calib, search_windows=(fit, held_out),
                     windows=token_windows(tok, spec.data, spec.windows, spec.seq_len), rotations=rotations,
                     plans=plans, scope=spec.scope, device=device, batch_size=batch_size, done=done, on_row=save,
                     progress=progress)
    report = save(result)
    if out is not None:
        plot(report, out / "compare.png")
    return report


def table(result: dict) -> str:
    """Markdown: a row per method, a column per target; each cell PPL (measured parameter-weighted sparsity;
    weight bytes read relative to dense)."""
    targets = result["targets"]
    lines = ["| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |", "|---|" + "---:|" * len(targets)]
    for method in result["methods"]:
        cells = []
        for t in [0.0] if method == "dense" else targets:
            row = next((r for r in result["rows"] if r["method"] == method and r["target"] == t), None)
            cells.append("not run yet" if row is None else f"n/a ({row['error'][:60]})" if "error" in row else
                         f"{row['ppl']:.3f} ({row['measured_param_weighted']:.3f}; "
                         f"{row.get('relative_bytes', 1 - row['measured_param_weighted']):.3f})")
        if method == "dense":
            cells = cells * len(targets)
        lines.append(f"| {ROWS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str | Path, cap: float = 2.0) -> None:
    """PPL against the weight bytes a token reads relative to dense (adapters counted: what decides speed), a line
    per method, dense as a dashed level. Points above ``cap`` x dense are drawn on the top edge with their value, so
    one collapsed method does not flatten the rest."""
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
            x = [r.get("relative_bytes", 1 - r["measured_param_weighted"]) for r in rows]
            line, = ax.plot(x, [min(r["ppl"], top) for r in rows], marker="o", label=ROWS[method])
            for xi, r in zip(x, rows):
                if r["ppl"] > top:
                    ax.annotate(f"{r['ppl']:.0f}", (xi, top), textcoords="offset points", xytext=(0, -12),
                                ha="center", fontsize=7, color=line.get_color())
    ax.set_xlabel("weight bytes read per token, relative to dense (adapters counted)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
