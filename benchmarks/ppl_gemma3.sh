#!/usr/bin/env bash
# Gemma 3 270M (base, Q4_K_M GGUF dequantized to float32; benchmarks/gemma3_270m.py builds it from PyPI) on a
# reduced CPU perplexity protocol: calibrate on the first CALIB_WINDOWS x SEQ_LEN tokens of calib-wikipedia.txt,
# score the first WINDOWS x SEQ_LEN windows of WikiText-2 test. Rows: dense; LaRoSa simulate, block scope, gained
# PCA; the folded default (gain-free PCA, global scope; Gemma 3 folds in the input form only); TEAL greedy; then
# the --select threshold variants of the two LaRoSa rows. Each run is written atomically to OUT/NAME.json (its
# wall seconds to OUT/NAME.wall, its stderr to OUT/NAME.log) and skipped when done; a failed run is logged, marked
# OUT/NAME.failed (skipped on resume unless RETRY=1) and the others go on (exit status 1 at the end).
# Gemma 3 270M has pre-feedforward norm gains of exactly 0 (17 of 18 layers): calibrate takes the gain-free
# signal from the norms' inputs, so the folded default runs (larosa before 2026-11-30 refused it).
#   bash benchmarks/ppl_gemma3.sh OUT [TARGETS]
#   env: MODEL (default: built by benchmarks/gemma3_270m.py under CKPT=/work/gemma-ckpt), WINDOWS=8,
#        CALIB_WINDOWS=8, SEQ_LEN=1024, TEAL=1 / THRESHOLD=1 (0 skips the TEAL / threshold rows), NICE=19,
#        LAROSA_DEVICE_ARGS (default "--device cpu --dtype float32"), LAROSA (the larosa command)
set -uo pipefail
out=${1:-runs/gemma3}
targets=${2:-"0.4 0.5"}
data=${LAROSA_SHARED_DATA:-../shared/data}
here=$(cd "$(dirname "$0")" && pwd)
larosa=${LAROSA:-larosa}
nice_=(nice -n "${NICE:-19}")
model=${MODEL:-$("${nice_[@]}" python "$here/gemma3_270m.py" "${CKPT:-/work/gemma-ckpt}")} || exit 1
windows=${WINDOWS:-8} calib_windows=${CALIB_WINDOWS:-8} seq=${SEQ_LEN:-1024}
dev=${LAROSA_DEVICE_ARGS:-"--device cpu --dtype float32"}
calib=(--calib-data "$data/calib-wikipedia.txt" --calib-windows "$calib_windows" --calib-seq-len "$seq")
mkdir -p "$out"
failed=0
timed() {  # NAME CMD...: stdout to OUT/NAME.json via .tmp, wall seconds to OUT/NAME.wall; skipped when done
  local name=$1; shift
  [ -s "$out/$name.json" ] && return 0
  [ -e "$out/$name.failed" ] && [ "${RETRY:-0}" != 1 ] && { echo "skip $name (failed before; RETRY=1)" >&2; failed=1; return 1; }
  local t0 t1
  t0=$(date +%s.%N)
  if "${nice_[@]}" "$@" > "$out/$name.json.tmp" 2> "$out/$name.log"; then
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc > "$out/$name.wall.tmp" && mv "$out/$name.wall.tmp" "$out/$name.wall"
    mv "$out/$name.json.tmp" "$out/$name.json"
    rm -f "$out/$name.failed"
    echo "done $name ($(cat "$out/$name.wall") s)" >&2
  else
    echo "FAILED $name: $* (see $out/$name.log)" >&2
    rm -f "$out/$name.json.tmp"
    echo "$*" > "$out/$name.failed"
    failed=1
    return 1
  fi
}
for signal in gain gainfree; do
  timed "calibrate-$signal" "$larosa" calibrate "$model" --signal "$signal" $dev --data "$data/calib-wikipedia.txt" \
    --windows "$calib_windows" --seq-len "$seq" --out "$out/rotations-$signal.safetensors" --json --quiet
done
run() {  # NAME ARGS...: one evaluation
  local name=$1; shift
  timed "$name" "$larosa" eval ppl "$model" --data "$data/wikitext-2-raw-test.txt" --windows "$windows" \
    --seq-len "$seq" --batch-size 1 $dev --json --quiet "$@"
}
sim=(--rotations "$out/rotations-gain.safetensors" --mode simulate --scope block)
folded=(--rotations "$out/rotations-gainfree.safetensors" --mode folded)
run dense
for t in $targets; do
  run "simulate-block-gain-$t" "${sim[@]}" --target "$t"
  run "folded-default-$t" "${folded[@]}" --target "$t"
  run "folded-global-gain-$t" --rotations "$out/rotations-gain.safetensors" --mode folded --target "$t"
done
if [ "${TEAL:-1}" = 1 ]; then  # last of the main rows: its greedy calibration is the slowest on a CPU (~45 min)
  for t in $targets; do
    run "teal-greedy-$t" --method teal-greedy --target "$t" "${calib[@]}"
  done
fi
if [ "${THRESHOLD:-1}" = 1 ]; then
  for t in $targets; do
    run "simulate-block-gain-threshold-$t" "${sim[@]}" --target "$t" --select threshold "${calib[@]}"
    run "folded-default-threshold-$t" "${folded[@]}" --target "$t" --select threshold "${calib[@]}"
    run "folded-global-gain-threshold-$t" --rotations "$out/rotations-gain.safetensors" --mode folded \
      --target "$t" --select threshold "${calib[@]}"
  done
fi
exit $failed
