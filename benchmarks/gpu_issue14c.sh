#!/usr/bin/env bash
# Issue 14 on the device machine, in stages (comma list, in order), results tarred to $OUT/r.tgz after each:
#   lmeval   install lm-evaluation-harness from carried wheels (.dev/lmeval) and unpack the task data (.dev/t)
#   wa       TEAL greedy, centred (median), weight-aware, on the globally rotated SmolLM2 (WA_TARGETS)
#   control  TEAL greedy, centred (median), on SmolLM2 as it is (CONTROL_TARGETS)
#   quarter  TEAL greedy, centred (median), rotated, 25 % (QUARTER_TARGETS; SCORE applies)
#   tasks    zero-shot, 8 tasks, LIMIT (250) each: dense and TEAL greedy at 0.4 (unless TASK_BASE=0), and each TASK_ROWS entry (";" between
#            them) NAME:TARGET:OPTIONS (options after --method teal-greedy, ROT standing for the rotations file)
# The SmolLM2 wheel comes in two parts over two calls (benchmarks/device_env.sh). fp32, the PPL protocol of
# benchmarks/gpu_issue14b.sh (calibration 16 x 2048, WikiText-2 first 40 x 2048).
set -uo pipefail
source benchmarks/device_env.sh || exit 1
export LAROSA_ARGS="--device cuda --dtype float32" OMP_NUM_THREADS=8
res=$OUT/r r=/tmp/i14 data=$LAROSA_SHARED_DATA
mkdir -p "$res" $r/global
[ -d /tmp/lmsite ] && export PYTHONPATH=$PYTHONPATH:/tmp/lmsite
rot=$r/global/rotations-gainfree.safetensors
rotations() {
  [ -s $rot ] || larosa calibrate builtin:smollm2 --signal gainfree $LAROSA_ARGS --data "$data/calib-wikipedia.txt" \
    --windows 16 --seq-len 2048 --out $rot --json --quiet > /dev/null
}
teal() {  # NAME ROTATIONS|none TARGETS, environment CENTRE SCORE
  python3 benchmarks/rotated_teal.py "$2" "$res/$1.json" "$3" 2>&1 | grep -v Warn
}
task() {  # NAME ARGS...
  local name=$1; shift
  [ -s "$res/tasks-$name.json" ] && return 0
  larosa eval tasks builtin:smollm2 --tasks arc_easy,arc_challenge,boolq,hellaswag,openbookqa,piqa,winogrande,sciq \
    --task-data /tmp/tasks --limit ${LIMIT:-250} --batch-size 16 --json --quiet $LAROSA_ARGS "$@" \
    > "$res/tasks-$name.json.tmp" 2> "$res/tasks-$name.err" && mv "$res/tasks-$name.json.tmp" "$res/tasks-$name.json"
  echo "$name $(date +%T)"; tail -2 "$res/tasks-$name.err"
}
for stage in ${1//,/ }; do
  echo "== $stage $(date +%T)"
  case $stage in
    lmeval) [ -d .dev/lmeval ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lmsite \
              .dev/lmeval/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/lmsite
            [ -s .dev/t/tasks.tgz ] && tar xzf .dev/t/tasks.tgz -C /tmp && ls /tmp/tasks
            python3 -c "import lm_eval, datasets; print('lm_eval', lm_eval.__version__, 'datasets', datasets.__version__)" ;;
    wa) rotations; ALLOCATIONS=greedy CENTRE=median SCORE=weight teal wa $rot "${WA_TARGETS:-0.41,0.51,0.53}" ;;
    control) ALLOCATIONS=greedy CENTRE=median teal control none "${CONTROL_TARGETS:-0.4,0.5}" ;;
    quarter) rotations; ALLOCATIONS=greedy CENTRE=median teal quarter $rot "${QUARTER_TARGETS:-0.26}" ;;
    tasks) rotations
           if [ "${TASK_BASE:-1}" = 1 ]; then
             task dense
             task teal-greedy-40 --method teal-greedy --target 0.4 --calib-data "$data/calib-wikipedia.txt"
           fi
           IFS=';' read -ra rows <<< "${TASK_ROWS:-}"
           for row in "${rows[@]}"; do
             IFS=: read -r name target options <<< "$row"
             task "$name" --method teal-greedy --target "$target" --calib-data "$data/calib-wikipedia.txt" \
               ${options//ROT/$rot}
           done ;;
    *) echo "unknown stage $stage" ;;
  esac
  tar czf "$OUT/r.tgz.tmp" -C "$OUT" r && mv "$OUT/r.tgz.tmp" "$OUT/r.tgz"
done
rm -rf "$res"
