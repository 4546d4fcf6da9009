#!/usr/bin/env bash
# The project's perplexity protocol (shared/data/README.md) on SmolLM2-135M-Instruct, CPU, float32:
# calibrate on calib-wikipedia.txt (16 x 2048), evaluate on the first 40 windows of WikiText-2 test.
# Usage: bash benchmarks/ppl_protocol.sh [OUTDIR]   (writes one JSON per run)
set -euo pipefail
out=${1:-runs/ppl_protocol}
data=${LAROSA_SHARED_DATA:-../shared/data}
mkdir -p "$out"
larosa calibrate builtin:smollm2 --data "$data/calib-wikipedia.txt" --windows 16 --seq-len 2048 \
  --out "$out/rotations.safetensors" --json --quiet > "$out/calibrate.json"
eval_ppl() { larosa eval ppl builtin:smollm2 --data "$data/wikitext-2-raw-test.txt" --windows 40 --json --quiet "$@"; }
eval_ppl > "$out/dense.json"
for scope in block layer; do
  for s in 0.25 0.4 0.5; do
    eval_ppl --rotations "$out/rotations.safetensors" --sparsity $s --scope $scope > "$out/$scope-$s.json"
  done
done
