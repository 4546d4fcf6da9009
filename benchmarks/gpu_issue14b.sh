#!/usr/bin/env bash
# Issue 14 on the device machine: TEAL (greedy and uniform; CENTRE=mean|median centres it; ALLOCATIONS=greedy
# keeps one) on the globally rotated SmolLM2, or on SmolLM2 as it is with ROTATED=0 (benchmarks/rotated_teal.py,
# TARGETS), to $OUT/rotated_teal.json; then, with OBJECTIVE=1, the rotation objectives (benchmarks/ppl_objective.sh)
# until the deadline (LIMIT seconds).
set -uo pipefail
source benchmarks/device_env.sh || exit 1
export LAROSA_ARGS="--device cuda --dtype float32" OMP_NUM_THREADS=8
r=/tmp/i14 data=$LAROSA_SHARED_DATA deadline=$((SECONDS + ${LIMIT:-480}))
mkdir -p $r/global
rot=$r/global/rotations-gainfree.safetensors
if [ "${ROTATED:-1}" = 1 ]; then
  [ -s $rot ] || larosa calibrate builtin:smollm2 --signal gainfree $LAROSA_ARGS --data "$data/calib-wikipedia.txt" \
    --windows 16 --seq-len 2048 --out $rot --json --quiet > /dev/null
else
  rot=none
fi
timeout $((deadline - SECONDS)) python3 benchmarks/rotated_teal.py $rot $OUT/rotated_teal.json ${TARGETS:-0.25,0.4,0.5} 2>&1 | grep -v Warn
[ "${OBJECTIVE:-0}" = 1 ] || exit 0
left=$((deadline - SECONDS))
[ $left -gt 60 ] && WINDOWS=40 timeout $left bash benchmarks/ppl_objective.sh $r/objective "0.4 0.5" > $r/objective.log 2>&1
tar czf $OUT/objective.tgz --exclude='*.safetensors' -C $r objective objective.log
# the evaluations (not the rotations reports, rotations-*.json), one line each
for f in $r/objective/[!r]*.json; do [ -s $f ] && echo "$(basename $f) $(python3 -c "import json,sys;d=json.load(open('$f'));print(round(d['ppl'],3), round(d.get('measured_param_weighted',0),3))")"; done
