#!/usr/bin/env bash
# Issue 5's comparison on SmolLM2-135M-Instruct with the project protocol (calibrate on calib-wikipedia.txt
# 16 x 2048; WikiText-2 test first 40 windows of 2048; float32): dense, TEAL uniform / greedy, CATS, LaRoSa with
# the fixed split, searched, searched + weight-aware, at parameter-weighted 25 / 40 / 50 %. LaRoSa runs in
# simulate mode, block scope, on the gain-included Q (the best simulate configuration measured in issue 3).
# LAROSA_ARGS is passed to every command (for example "--device cuda --dtype float32").
# Usage: [LAROSA_ARGS=...] bash benchmarks/compare.sh [OUTDIR]
set -euo pipefail
out=${1:-runs/compare}
data=${LAROSA_SHARED_DATA:-../shared/data}
args=${LAROSA_ARGS:-}
mkdir -p "$out"
[ -s "$out/rotations-gain.safetensors" ] || larosa calibrate builtin:smollm2 --signal gain $args \
  --data "$data/calib-wikipedia.txt" --windows 16 --seq-len 2048 \
  --out "$out/rotations-gain.safetensors" --json --quiet > "$out/calibrate.json"
larosa compare builtin:smollm2 $args --rotations "$out/rotations-gain.safetensors" \
  --data "$data/wikitext-2-raw-test.txt" --windows 40 --calib-data "$data/calib-wikipedia.txt" \
  --calib-windows 16 --search-windows 4 --sparsity 0.25,0.4,0.5 --out "$out" --json > "$out/stdout.json"
