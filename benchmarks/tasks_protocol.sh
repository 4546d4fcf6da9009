#!/usr/bin/env bash
# Issue 6's zero-shot table on SmolLM2-135M-Instruct: the eight tasks of ../shared/data/tasks through
# lm-evaluation-harness (0-shot, first LIMIT documents each): dense, LaRoSa and TEAL (uniform) at 40 %
# parameter-weighted sparsity. LaRoSa: simulate, block scope, gain-included Q calibrated on calib-wikipedia.txt
# 16 x 2048 (the best simulate configuration of issue 3), default 0.8 / 1.2 split; TEAL's thresholds from the
# same 16 x 2048 tokens.
# LAROSA_ARGS is passed to every command (for example "--device cuda --dtype float32").
# Usage: [LIMIT=250|all] [LAROSA_ARGS=...] bash benchmarks/tasks_protocol.sh [OUTDIR]
set -euo pipefail
out=${1:-runs/tasks}
data=${LAROSA_SHARED_DATA:-../shared/data}
args=${LAROSA_ARGS:-}
limit=${LIMIT:-250}
[ "$limit" = all ] && limit_args="" || limit_args="--limit $limit"
tasks=arc_easy,arc_challenge,boolq,hellaswag,openbookqa,piqa,winogrande,sciq
mkdir -p "$out"
[ -s "$out/rotations-gain.safetensors" ] || larosa calibrate builtin:smollm2 --signal gain $args \
  --data "$data/calib-wikipedia.txt" --windows 16 --seq-len 2048 \
  --out "$out/rotations-gain.safetensors" --json --quiet > "$out/calibrate.json"
run() {  # NAME ARGS...: one evaluation, written atomically, skipped when done
  local name=$1; shift
  [ -s "$out/$name.json" ] && return 0
  /usr/bin/time -f "%e s wall, %M KB peak" -o "$out/$name.time" larosa eval tasks builtin:smollm2 --tasks $tasks \
    --task-data "$data/tasks" $limit_args --batch-size 16 --json --quiet $args "$@" > "$out/$name.json.tmp"
  mv "$out/$name.json.tmp" "$out/$name.json"
}
run dense
run larosa-40 --rotations "$out/rotations-gain.safetensors" --target 0.4 --scope block
run teal-40 --method teal --target 0.4 --calib-data "$data/calib-wikipedia.txt" --calib-windows 16
