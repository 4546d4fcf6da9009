#!/usr/bin/env bash
# Issue 14's measurements in one device call (resumable in the next while the machine is warm: results live in
# /tmp/i14): benchmarks/compare.sh (every method and LaRoSa row, block and global) and benchmarks/ppl_objective.sh
# (PCA against the weighted objective), side by side on the GPU, stopped at LIMIT seconds; what is finished is
# tarred to $OUT. Needs the SmolLM2 wheel's parts carried in earlier calls (benchmarks/device_env.sh).
set -uo pipefail
source benchmarks/device_env.sh || exit 1
export LAROSA_ARGS="--device cuda --dtype float32"
r=/tmp/i14
mkdir -p $r
find $r -name '*.tmp' -delete
BATCH=4 timeout "${LIMIT:-520}" bash benchmarks/compare.sh $r/compare > $r/compare.log 2>&1 & c=$!
WINDOWS=40 timeout "${LIMIT:-520}" bash benchmarks/ppl_objective.sh $r/objective "0.25 0.4 0.5" > $r/objective.log 2>&1 & o=$!
wait $c; echo "compare rc=$?"; wait $o; echo "objective rc=$?"
tail -3 $r/compare.log $r/objective.log
cd $r && tar czf $OUT/i14.tgz --exclude='*.safetensors' compare objective compare.log objective.log
ls compare/block compare/global objective | head -80
