# Sourced by the SmolLM2 perplexity drivers (ppl_select.sh, ppl_objective.sh): the project protocol's data, and
# its two steps, each resumable. Set `out` before sourcing. LAROSA_ARGS goes to every command; WINDOWS is the
# evaluation windows (default 40).
data=${LAROSA_SHARED_DATA:-../shared/data}
args=${LAROSA_ARGS:-}
mkdir -p "$out"
calibrate_once() {  # FILE ARGS...: rotations from calib-wikipedia.txt 16 x 2048 (report beside), unless FILE exists
  local file=$1; shift
  [ -s "$file" ] || larosa calibrate builtin:smollm2 "$@" $args --data "$data/calib-wikipedia.txt" --windows 16 \
    --seq-len 2048 --out "$file" --json --quiet > "${file%.safetensors}.json"
}
run() {  # NAME ARGS...: one evaluation on WikiText-2 test into $out/NAME.json, written atomically, skipped when done
  local name=$1; shift
  [ -s "$out/$name.json" ] && return 0
  larosa eval ppl builtin:smollm2 --data "$data/wikitext-2-raw-test.txt" --windows "${WINDOWS:-40}" --json --quiet \
    $args "$@" > "$out/$name.json.tmp"
  mv "$out/$name.json.tmp" "$out/$name.json"
}
