#!/usr/bin/env bash
# The second of two device calls for the real SmolLM2 (its wheel travels in two parts: .dev/a/part with the first
# call, .dev/b/part with this one): calibrate, fold with thresholds, time it, generate, and the perplexity of exact
# Top-K against thresholds on the protocol. Results under $OUT.
set -uo pipefail
source benchmarks/device_env.sh || exit 1
args="--device cuda --dtype float32"
data=$LAROSA_SHARED_DATA
r=/tmp/s2
mkdir -p $r
larosa calibrate builtin:smollm2 --signal gainfree $args --data "$data/calib-wikipedia.txt" --windows 16 \
  --out $r/rot.safetensors --json --quiet > $r/calibrate.json || exit 1
larosa sparsify builtin:smollm2 --rotations $r/rot.safetensors --target 0.5 --select threshold --device cuda \
  --calib-data "$data/calib-wikipedia.txt" --calib-windows 16 --out $r/smollm2-50 --json --quiet > $OUT/sparsify.json
larosa bench decode --model $r/smollm2-50 --repeats 3 --out $OUT 2>&1 | grep -v Warning | tail -12
larosa generate $r/smollm2-50 --chat --prompt "Name three uses of a rotation matrix." --max-new-tokens 48 --quiet \
  2>&1 | tail -6 | tee $OUT/generate.txt
LAROSA_ARGS="$args" bash benchmarks/ppl_select.sh $r/ppl > /dev/null 2>&1
python3 - "$r/ppl" > "$OUT/ppl_select.md" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
rows = {p.stem: json.loads(p.read_text()) for p in d.glob("*.json") if not p.stem.startswith("rotations")}
print("| run | PPL | param-weighted (configured) | measured |")
print("|---|---:|---:|---:|")
for name in sorted(rows):
    r = rows[name]
    print(f"| {name} | {r['ppl']:.3f} | {r['param_weighted_sparsity']:.3f} | {r['measured_param_weighted']:.3f} |")
PY
cat "$OUT/ppl_select.md"
tar czf $OUT/ppl_select.tgz -C $r ppl/*.json 2>/dev/null
exit 0
