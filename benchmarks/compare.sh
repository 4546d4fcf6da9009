#!/usr/bin/env bash
# Issue 5's comparison on SmolLM2-135M-Instruct with the project protocol (calibrate on calib-wikipedia.txt
# 16 x 2048; WikiText-2 test first 40 windows of 2048; float32) at parameter-weighted 25 / 40 / 50 %, two parts
# run side by side:
#   OUTDIR/block:  dense, TEAL uniform / greedy, CATS, and LaRoSa (fixed split, searched, searched + weight-aware)
#                  simulated in block scope on the gain-included Q (the best simulate configuration of issue 3);
#   OUTDIR/global: the three LaRoSa rows in the deployable form, global scope on the gain-free Q (what
#                  `larosa sparsify` folds into the weights; folded = simulate for the same Q, tested).
# Resumable: `larosa compare` keeps the finished runs and searched plans of an interrupted run in its --out.
# LAROSA_ARGS is passed to every command (for example "--device cuda --dtype float32"); BATCH windows run per
# forward pass in the evaluations and searches (default 1; 4 on a GPU: the same numbers, faster).
# Usage: [BATCH=N] [LAROSA_ARGS=...] bash benchmarks/compare.sh [OUTDIR]
set -euo pipefail
out=${1:-runs/compare}
data=${LAROSA_SHARED_DATA:-../shared/data}
args=${LAROSA_ARGS:-}
mkdir -p "$out/block" "$out/global"
for part in block:gain global:gainfree; do  # one at a time: parallel CPU eigendecompositions oversubscribe cores
  dir=$out/${part%:*} signal=${part#*:}
  [ -s "$dir/rotations-$signal.safetensors" ] || larosa calibrate builtin:smollm2 --signal $signal $args \
    --data "$data/calib-wikipedia.txt" --windows 16 --seq-len 2048 \
    --out "$dir/rotations-$signal.safetensors" --json --quiet > "$dir/calibrate.json"
done
compare() {  # DIR SIGNAL SCOPE METHODS
  larosa compare builtin:smollm2 $args --rotations "$out/$1/rotations-$2.safetensors" --scope $3 --methods $4 \
    --data "$data/wikitext-2-raw-test.txt" --windows 40 --calib-data "$data/calib-wikipedia.txt" \
    --calib-windows 16 --search-windows 4 --target 0.25,0.4,0.5 --batch-size ${BATCH:-1} --out "$out/$1" \
    --json --quiet > /dev/null
}
compare block gain block dense,teal,teal-greedy,cats,larosa,larosa-searched,larosa-threshold,larosa-searched-threshold,larosa-centred,larosa-centred-threshold & block=$!
compare global gainfree global larosa,larosa-threshold,larosa-centred,larosa-centred-threshold,larosa-searched,larosa-searched-threshold,larosa-searched-centred-threshold,larosa-searched-wa-threshold & global=$!
rc=0; wait $block || rc=$?; wait $global || rc=$?; exit $rc
