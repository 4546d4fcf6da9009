#!/usr/bin/env bash
# Issue 3's table on SmolLM2-135M-Instruct with the project protocol (calibrate on calib-wikipedia.txt 16 x 2048,
# WikiText-2 test first 40 windows of 2048, float32): dense; simulate mode with the reference code's Q (gain
# included) in layer and block scope; folded layer / global / block scopes with and without the per-head o_proj
# rotation on the gain-free signal (what folded Top-K sees); folded layer scope on the gain-included Q; folded
# global and block scopes with weight-aware scores.
# Skips runs whose JSON exists, so it can be resumed. JOBS runs in parallel (useful on a GPU); LAROSA_ARGS is
# passed to every command (for example "--device cuda --dtype float32").
# Usage: [JOBS=N] [LAROSA_ARGS=...] bash benchmarks/ppl_folded.sh [OUTDIR] [SPARSITIES]
set -euo pipefail
out=${1:-runs/ppl_folded}
sparsities=${2:-"0.25 0.4 0.5"}
data=${LAROSA_SHARED_DATA:-../shared/data}
args=${LAROSA_ARGS:-}
mkdir -p "$out"
for signal in gain gainfree; do
  [ -s "$out/rotations-$signal.safetensors" ] || larosa calibrate builtin:smollm2 --signal $signal $args \
    --data "$data/calib-wikipedia.txt" --windows 16 --seq-len 2048 \
    --out "$out/rotations-$signal.safetensors" --json --quiet > "$out/calibrate-$signal.json"
done
runs=$(mktemp)
run() {  # NAME ARGS...: one evaluation, written atomically, skipped when done
  local name=$1; shift
  [ -s "$out/$name.json" ] || echo "larosa eval ppl builtin:smollm2 --data '$data/wikitext-2-raw-test.txt' \
--windows 40 --json --quiet $args $* > '$out/$name.json.tmp' && mv '$out/$name.json.tmp' '$out/$name.json'" >> "$runs"
}
run dense
for s in $sparsities; do
  for scope in layer block; do
    run "simulate-$scope-gainQ-$s" --rotations "$out/rotations-gain.safetensors" --sparsity "$s" --scope $scope
  done
  for scope in layer global block; do
    run "folded-$scope-$s" --mode folded --rotations "$out/rotations-gainfree.safetensors" --sparsity "$s" --scope $scope
    run "folded-$scope-heads-$s" --mode folded --rotations "$out/rotations-gainfree.safetensors" --sparsity "$s" \
      --scope $scope --head-rotation
  done
  run "folded-layer-gainQ-$s" --mode folded --rotations "$out/rotations-gain.safetensors" --sparsity "$s" --scope layer
  for scope in global block; do  # weight-aware scores (|x_i| ||W_i||): do they close the gap to simulate?
    run "folded-$scope-wa-$s" --mode folded --rotations "$out/rotations-gainfree.safetensors" --sparsity "$s" \
      --scope $scope --score weight
  done
done
xargs -P "${JOBS:-1}" -d '\n' -I{} bash -c {} < "$runs"
rm -f "$runs"
