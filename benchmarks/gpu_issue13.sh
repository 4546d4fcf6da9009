#!/usr/bin/env bash
# Issue 13 on the device machine, in stages (comma list, in order), results tarred to $OUT/r.tgz:
#   tests    the kernel and engine tests on the GPU (and the families' engine tests)
#   l2g l2l l3g l3l   larosa bench decode: Llama-2-7B / Llama-3-8B shapes, global / layer scope, 25 / 40 / 50 %
#   prof     benchmarks/profile_decode.py: Llama-2-7B global, dense and 50 %, threshold and exact Top-K
#   teal     larosa bench decode --select threshold,teal: TEAL's per-projection thresholds against LaRoSa's, Llama-2-7B
#   pdl      the PDL test alone
#   bash benchmarks/gpu_issue13.sh tests,l2g
set -uo pipefail
source benchmarks/device_env.sh || exit 1
res=$OUT/r
mkdir -p "$res"
decode() {  # NAME CONFIG SCOPE
  larosa bench decode --config "$2" --scope "$3" --repeats 2 --out "$res/decode-$1" 2>&1 | grep -v "^\s*$" | tail -15
}
for stage in ${1//,/ }; do
  echo "== $stage $(date +%T)"
  case $stage in
    pdl) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k pdl 2>&1 | tail -5 | tee "$res/pdl.log" ;;
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine.py \
             tests/test_families.py::test_the_kernels_decode_the_family_in_the_cuda_graph_as_transformers 2>&1 | tail -15 \
             | tee "$res/tests.log" ;;
    l2g) decode llama2-7b-global llama2-7b global ;;
    l2l) decode llama2-7b-layer llama2-7b layer ;;
    l3g) decode llama3-8b-global llama3-8b global ;;
    l3l) decode llama3-8b-layer llama3-8b layer ;;
    teal) larosa bench decode --config llama2-7b --scope global --select threshold,teal --repeats 2 --no-hf \
            --out "$res/decode-teal" 2>&1 | grep -v "^\s*$" | tail -15 ;;
    prof) for sel in threshold topk; do
            python3 benchmarks/profile_decode.py --config llama2-7b --sparsity 0,0.5 --select $sel \
              --out "$res/profile-$sel" 2>&1 | tail -30
          done ;;
    *) echo "unknown stage $stage" ;;
  esac
  tar czf "$OUT/r.tgz.tmp" -C "$OUT" r && mv "$OUT/r.tgz.tmp" "$OUT/r.tgz"  # what is done comes back on a timeout
done
rm -rf "$res"
