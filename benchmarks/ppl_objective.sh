#!/usr/bin/env bash
# The weighted rotation objective (calibrate --objective weighted: Q of diag(n) XᵀX diag(n)) against plain PCA on
# the SmolLM2 perplexity protocol at parameter-weighted targets, both folded in the input form (which folds
# either exactly; simulate = folded), plus the folded default (global, gain-free PCA, residual form) as reference.
#   bash benchmarks/ppl_objective.sh OUT [TARGETS]   (WINDOWS=N scores the first N windows, default 40;
#   LAROSA_ARGS="--device cuda --dtype float32" on a GPU)
set -euo pipefail
out=${1:-runs/ppl_objective}
targets=${2:-"0.4 0.5"}
data=${LAROSA_SHARED_DATA:-../shared/data}
args=${LAROSA_ARGS:-}
mkdir -p "$out"
for rot in pca:gain pca:gainfree weighted:gain weighted:gainfree; do
  file=$out/rotations-${rot%:*}-${rot#*:}.safetensors
  [ -s "$file" ] || larosa calibrate builtin:smollm2 --objective "${rot%:*}" --signal "${rot#*:}" $args \
    --data "$data/calib-wikipedia.txt" --windows 16 --seq-len 2048 --out "$file" --json --quiet > /dev/null
done
run() {  # NAME ARGS...: one evaluation, written atomically, skipped when done
  local name=$1; shift
  [ -s "$out/$name.json" ] && return 0
  larosa eval ppl builtin:smollm2 --data "$data/wikitext-2-raw-test.txt" --windows "${WINDOWS:-40}" --json --quiet \
    $args "$@" > "$out/$name.json.tmp"
  mv "$out/$name.json.tmp" "$out/$name.json"
}
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
