"""Markdown table of a ppl_folded.sh output directory: one row per configuration, one column per sparsity.

Usage: python3 benchmarks/ppl_table.py OUTDIR
"""

import json
import sys
from pathlib import Path

ROWS = [  # (file stem, label)
    ("simulate-layer-gainQ", "simulate, layer scope, gain-included Q (reference code)"),
    ("simulate-block-gainQ", "simulate, block scope, gain-included Q"),
    ("folded-layer-gainQ", "folded layer, gain-included Q"),
    ("folded-layer", "folded layer"),
    ("folded-layer-heads", "folded layer + head rotation"),
    ("folded-global", "folded global"),
    ("folded-global-heads", "folded global + head rotation"),
    ("folded-block", "folded block"),
    ("folded-block-heads", "folded block + head rotation"),
    ("folded-global-wa", "folded global, weight-aware scores"),
    ("folded-block-wa", "folded block, weight-aware scores"),
]


def main(out: Path) -> None:
    runs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if not p.stem.startswith("calibrate")}
    levels = sorted({r["nominal_sparsity"] for r in runs.values() if r["nominal_sparsity"]})
    weighted = {s: next(r["param_weighted_sparsity"] for r in runs.values() if r["nominal_sparsity"] == s)
                for s in levels}
    print(f"dense PPL {runs['dense']['ppl']:.3f}\n")
    print("| configuration | adapter bytes / layer | " + " | ".join(
        f"{s:.0%} (param-weighted {weighted[s]:.3f})" for s in levels) + " |")
    print("|---|---:|" + "---:|" * len(levels))
    for stem, label in ROWS:
        cells = [runs.get(f"{stem}-{s}") for s in levels]
        if not any(cells):
            continue
        overhead = next(c["adapter_overhead"] for c in cells if c)
        print(f"| {label} | {overhead:.1%} | " + " | ".join(f"{c['ppl']:.3f}" if c else "-" for c in cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
