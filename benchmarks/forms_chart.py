"""Issue 14's chart: every SmolLM2 form measured (H200, float32, the protocol), perplexity against the weight bytes a
token reads relative to dense (adapters counted), from the committed results.

Usage: python3 benchmarks/forms_chart.py OUT.png
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COMPARE = {  # (scope directory, compare row) -> label
    ("block", "teal"): "TEAL uniform",
    ("block", "teal-greedy"): "TEAL greedy",
    ("block", "larosa-searched"): "LaRoSa simulate block, Top-K searched (input form)",
    ("block", "larosa-searched-centred-threshold"): "LaRoSa block, searched + centred + thresholds (input form)",
    ("global", "larosa"): "LaRoSa folded global Top-K (the default before)",
    ("global", "larosa-searched"): "LaRoSa folded global Top-K, searched",
    ("global", "larosa-searched-centred-threshold"): "LaRoSa folded global, searched + centred + thresholds",
}
GREEDY = {  # results file -> label; bytes = 1 - measured sparsity (no adapters)
    "2026-12-01-s9/rotated_teal-centred-wa.json": "LaRoSa greedy: rotated + centred + weight-aware (the default now)",
    "2026-11-30-s8/rotated_teal-centred.json": "LaRoSa greedy without weights (rotated + centred)",
    "2026-12-01-s9/teal-greedy-centred-control.json": "TEAL greedy centred, unrotated (control)",
}


def points() -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for (scope, method), label in COMPARE.items():
        rows = json.loads((RESULTS / "2026-11-30-s6" / scope / "compare.json").read_text())["rows"]
        series[label] = [(r["relative_bytes"], r["ppl"]) for r in rows if r["method"] == method]
    for name, label in GREEDY.items():
        rows = json.loads((RESULTS / name).read_text())
        if label.startswith("LaRoSa greedy without"):  # its 25 % point came in session 9
            rows += json.loads((RESULTS / "2026-12-01-s9/rotated_teal-centred-25.json").read_text())
        series[label] = [(1 - r["measured_param_weighted"], r["ppl"]) for r in rows if r["measured_param_weighted"]]
    return {label: sorted(p) for label, p in series.items()}


def main(out: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 6))
    for label, p in points().items():
        bold = "default now" in label or label == "TEAL greedy"
        ax.plot(*zip(*p), marker="o", ms=4, lw=2.2 if bold else 1.0, label=label)
    ax.axhline(20.574, color="grey", lw=0.8, ls=":", label="dense 20.574")
    ax.set(xlabel="weight bytes read per token, relative to dense (adapters counted)", ylabel="WikiText-2 PPL",
           title="SmolLM2-135M: every form at equal bytes read (H200, float32, 40 x 2048 tokens)")
    ax.set_ylim(20, 36)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1])
