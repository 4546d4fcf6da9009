#!/usr/bin/env bash
# Issue 14's perplexity rows on the GPU, one process at a time (two larosa processes started side by side on the
# device machine both stalled after loading the model, see RESULTS-ppl.md), resumable in the next call while
# the machine is warm (results live in /tmp/i14): the deployable global rows first, then block, then the
# rotation objectives, each stopped at the deadline (LIMIT seconds); what is finished is tarred to $OUT.
# Needs the SmolLM2 wheel's parts carried in earlier calls (benchmarks/device_env.sh).
set -uo pipefail
source benchmarks/device_env.sh || exit 1
export LAROSA_ARGS="--device cuda --dtype float32" OMP_NUM_THREADS=8
r=/tmp/i14 data=$LAROSA_SHARED_DATA deadline=$((SECONDS + ${LIMIT:-520}))
mkdir -p $r/global $r/block
find $r -name '*.tmp' -delete
left() { echo $((deadline - SECONDS)); }
for part in block:gain global:gainfree; do
  f=$r/${part%:*}/rotations-${part#*:}.safetensors
  [ -s "$f" ] || larosa calibrate builtin:smollm2 --signal ${part#*:} $LAROSA_ARGS --data "$data/calib-wikipedia.txt" \
    --windows 16 --seq-len 2048 --out "$f" --json --quiet > $r/${part%:*}/calibrate.json
done
compare() {  # SCOPE SIGNAL METHODS
  [ "$(left)" -gt 20 ] || return 0
  timeout "$(left)" larosa compare builtin:smollm2 $LAROSA_ARGS --rotations "$r/$1/rotations-$2.safetensors" \
    --scope $1 --methods $3 --data "$data/wikitext-2-raw-test.txt" --windows 40 \
    --calib-data "$data/calib-wikipedia.txt" --calib-windows 16 --target 0.25,0.4,0.5 --batch-size 4 \
    --out "$r/$1" --json --quiet > /dev/null 2>> $r/compare.log
  echo "$1 rc=$? at $SECONDS s"
}
compare global gainfree larosa-threshold,larosa-centred-threshold,larosa-searched-threshold,larosa-searched-wa-threshold,larosa-searched-centred-threshold,larosa,larosa-searched,larosa-centred
compare block gain dense,teal,teal-greedy,larosa-searched,larosa-threshold,larosa-searched-threshold,larosa-searched-centred-threshold
[ "$(left)" -gt 60 ] && WINDOWS=40 timeout "$(left)" bash benchmarks/ppl_objective.sh $r/objective "0.4 0.5" \
  > $r/objective.log 2>&1
cd $r && tar czf $OUT/i14.tgz --exclude='*.safetensors' global block objective compare.log objective.log 2>/dev/null
python3 - <<'PY'
import json, pathlib
for part in ("global", "block"):
    p = pathlib.Path("/tmp/i14") / part / "compare.json"
    if p.exists():
        for r in json.loads(p.read_text())["rows"]:
            print(part, r["method"], r["target"], round(r.get("ppl", float("nan")), 3),
                  round(r.get("measured_param_weighted", 0), 3), r.get("relative_bytes"), r.get("setup_seconds"))
PY
