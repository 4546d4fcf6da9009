#!/usr/bin/env bash
# Issue 3's table on SmolLM2-135M-Instruct with the project protocol (calibrate on calib-wikipedia.txt 16 x 2048,
# WikiText-2 test first 40 windows of 2048, CPU float32): folded scopes with and without the per-head o_proj
# rotation, on rotations of the gain-free signal (what folded Top-K sees), plus the folded layer scope on the
# reference code's gain-included Q. Skips runs whose JSON exists, so it can be resumed.
# Usage: bash benchmarks/ppl_folded.sh [OUTDIR] [SPARSITIES]
set -euo pipefail
out=${1:-runs/ppl_protocol}
sparsities=${2:-"0.4 0.25 0.5"}
data=${LAROSA_SHARED_DATA:-../shared/data}
mkdir -p "$out"
[ -s "$out/rotations-gainfree.safetensors" ] || larosa calibrate builtin:smollm2 --signal gainfree \
  --data "$data/calib-wikipedia.txt" --windows 16 --seq-len 2048 \
  --out "$out/rotations-gainfree.safetensors" --json --quiet > "$out/calibrate-gainfree.json"
run() {  # NAME ARGS...
  local name=$1; shift
  [ -s "$out/$name.json" ] && return 0
  larosa eval ppl builtin:smollm2 --data "$data/wikitext-2-raw-test.txt" --windows 40 --json --quiet "$@" \
    > "$out/$name.json.tmp" && mv "$out/$name.json.tmp" "$out/$name.json"
}
for s in $sparsities; do
  for scope in layer global block; do
    run "folded-$scope-$s" --mode folded --rotations "$out/rotations-gainfree.safetensors" --sparsity "$s" --scope $scope
    run "folded-$scope-heads-$s" --mode folded --rotations "$out/rotations-gainfree.safetensors" --sparsity "$s" \
      --scope $scope --head-rotation
  done
  run "folded-layer-gainQ-$s" --mode folded --rotations "$out/rotations.safetensors" --sparsity "$s" --scope layer
done
