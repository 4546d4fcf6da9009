#!/usr/bin/env bash
# Exact Top-K against calibrated thresholds (--select) on the SmolLM2 perplexity protocol: the folded default
# (global scope, gain-free Q; simulate = folded for the same Q) at parameter-weighted targets.
#   bash benchmarks/ppl_select.sh OUT [TARGETS]     (LAROSA_ARGS="--device cuda --dtype float32" on a GPU)
set -euo pipefail
out=${1:-runs/ppl_select}
targets=${2:-"0.25 0.4 0.5"}
data=${LAROSA_SHARED_DATA:-../shared/data}
args=${LAROSA_ARGS:-}
mkdir -p "$out"
rot=$out/rotations-gainfree.safetensors
[ -s "$rot" ] || larosa calibrate builtin:smollm2 --signal gainfree $args --data "$data/calib-wikipedia.txt" \
  --windows 16 --seq-len 2048 --out "$rot" --json --quiet > "$out/calibrate.json"
run() {  # NAME ARGS...: one evaluation, written atomically, skipped when done
  local name=$1; shift
  [ -s "$out/$name.json" ] && return 0
  larosa eval ppl builtin:smollm2 --data "$data/wikitext-2-raw-test.txt" --windows 40 --json --quiet $args "$@" \
    > "$out/$name.json.tmp"
  mv "$out/$name.json.tmp" "$out/$name.json"
}
run dense
for t in $targets; do
  run "topk-$t" --rotations "$rot" --target "$t" --scope global
  run "threshold-$t" --rotations "$rot" --target "$t" --scope global --select threshold \
    --calib-data "$data/calib-wikipedia.txt" --calib-windows 16
done
