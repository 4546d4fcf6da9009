#!/usr/bin/env bash
# Exact Top-K against calibrated thresholds (--select) on the SmolLM2 perplexity protocol: the folded default
# (global scope, gain-free Q; simulate = folded for the same Q) at parameter-weighted targets.
#   bash benchmarks/ppl_select.sh OUT [TARGETS]     (LAROSA_ARGS="--device cuda --dtype float32" on a GPU)
set -euo pipefail
out=${1:-runs/ppl_select}
targets=${2:-"0.25 0.4 0.5"}
source "$(dirname "$0")/smollm2_ppl.sh"
rot=$out/rotations-gainfree.safetensors
calibrate_once "$rot" --signal gainfree
run dense
for t in $targets; do
  run "topk-$t" --rotations "$rot" --target "$t" --scope global
  run "threshold-$t" --rotations "$rot" --target "$t" --scope global --select threshold \
    --calib-data "$data/calib-wikipedia.txt" --calib-windows 16
done
