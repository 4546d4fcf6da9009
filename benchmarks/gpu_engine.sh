#!/usr/bin/env bash
# One device call: the GPU tests of the engine and kernels, then a decode benchmark, results under $OUT.
#   bash benchmarks/gpu_engine.sh "TEST FILES" "BENCH ARGS..."    (run from the repo root on the device machine)
set -uo pipefail
source benchmarks/device_env.sh || exit 1
tests=${1:-}
shift || true
if [ -n "$tests" ]; then
  python3 -m pytest -q -p no:cacheprovider $tests 2>&1 | tail -25 | tee "$OUT/tests.log"
fi
[ $# -gt 0 ] && larosa "$@" 2>&1 | grep -v "^\s*$" | tee "$OUT/bench.log"
exit 0
