"""Experiment (issue 14): TEAL's per-projection thresholds, greedy or uniform, on the globally rotated model.

The folded global form at sparsity 0 is a plain model of the same family with rotated weights (residual stream in
the basis of one gain-free Q, norm gains folded, no adapters; `larosa.fold.rotated`, which `TealConfig(rotations=...)`
uses), so TEAL can sit on it unchanged: rotation concentrates each projection's input, greedy allocation spends
sparsity where it hurts least.

    python benchmarks/rotated_teal.py ROTATIONS|none OUT.json [TARGETS]
ROTATIONS "none": TEAL on the model as it is, in the same harness. Environment: LAROSA_SHARED_DATA (the folder with
wikitext-2-raw-test.txt and calib-wikipedia.txt), WINDOWS (evaluation windows, 40), CALIB_WINDOWS (TEAL's, 16),
CENTRE (mean or median: centred thresholds), SCORE (weight: weight-aware thresholds), ALLOCATIONS
(greedy,uniform).
"""

import json
import os
import sys
import time

import torch

import larosa

rot_path, out = sys.argv[1], sys.argv[2]
targets = [float(t) for t in (sys.argv[3] if len(sys.argv) > 3 else "0.25,0.4,0.5").split(",")]
device = "cuda" if torch.cuda.is_available() else "cpu"
data = os.environ.get("LAROSA_SHARED_DATA", "../shared/data")
windows = int(os.environ.get("WINDOWS", 40))
model, tok = larosa.load_model("builtin:smollm2", device=device, dtype=torch.float32)
calib = larosa.token_windows(tok, f"{data}/calib-wikipedia.txt", int(os.environ.get("CALIB_WINDOWS", 16)), 2048)
evals = larosa.token_windows(tok, f"{data}/wikitext-2-raw-test.txt", windows, 2048)


def rotated(model):
    """The folded global form at sparsity 0 as a plain model of the family, checked: the dense logits."""
    probe = evals[:1, :128].to(device)
    with torch.no_grad():
        reference = model(probe).logits
        plain = larosa.fold.rotated(model, larosa.Rotations.load(rot_path))
        error = ((plain(probe).logits - reference).abs().max() / reference.abs().max()).item()
    assert error < 1e-4, error
    return plain


plain = model if rot_path == "none" else rotated(model)
prefix = "" if rot_path == "none" else "rotated-"
rows = [{"method": prefix + "dense", **larosa.perplexity(plain, evals, batch_size=4, progress=False)}]
print(rows[-1]["ppl"], flush=True)
centre = os.environ.get("CENTRE") or None
score = os.environ.get("SCORE") or "magnitude"
for allocation in os.environ.get("ALLOCATIONS", "greedy,uniform").split(","):
    greedy = allocation == "greedy"
    for t in targets:
        start = time.perf_counter()
        larosa.sparsify(plain, larosa.TealConfig(t, calib, greedy=greedy, centre=centre, score=score), device=device,
                        progress=False)
        r = larosa.perplexity(plain, evals, batch_size=4, progress=False)
        method = (prefix + ("teal-greedy" if greedy else "teal") + (f"-{centre}" if centre else "")
                  + ("-wa" if score == "weight" else ""))
        r.update({**larosa.describe(plain), "method": method, "target": t,
                  "seconds": round(time.perf_counter() - start, 1)})
        larosa.unsparsify(plain)
        rows.append(r)
        print(r["method"], t, round(r["ppl"], 3), r.get("measured_param_weighted"), flush=True)
        with open(out + ".tmp", "w") as f:
            json.dump(rows, f, indent=1, default=str)
        os.replace(out + ".tmp", out)
