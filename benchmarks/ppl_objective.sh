#!/usr/bin/env bash
# The weighted rotation objective (calibrate --objective weighted: Q of diag(n) XᵀX diag(n)) against plain PCA on
# the SmolLM2 perplexity protocol at parameter-weighted targets, both folded in the input form (which folds
# either exactly; simulate = folded), plus the folded default (global, gain-free PCA, residual form) as reference.
#   bash benchmarks/ppl_objective.sh OUT [TARGETS]   (WINDOWS=N scores the first N windows, default 40;
#   LAROSA_ARGS="--device cuda --dtype float32" on a GPU)
set -euo pipefail
out=${1:-runs/ppl_objective}
targets=${2:-"0.4 0.5"}
source "$(dirname "$0")/smollm2_ppl.sh"
for rot in pca:gain pca:gainfree weighted:gain weighted:gainfree; do
  calibrate_once "$out/rotations-${rot%:*}-${rot#*:}.safetensors" --objective "${rot%:*}" --signal "${rot#*:}"
done
run dense
for t in $targets; do
  run "default-$t" --rotations "$out/rotations-pca-gainfree.safetensors" --target "$t" --mode folded
  for objective in pca weighted; do
    for how in global:gainfree block:gain block:gainfree; do
      run "$objective-${how%:*}-${how#*:}-$t" --rotations "$out/rotations-$objective-${how#*:}.safetensors" \
        --target "$t" --mode folded --form input --scope "${how%:*}"
    done
  done
done
