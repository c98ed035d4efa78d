#!/usr/bin/env bash
# benchmarks/gpu.py on a GPU machine without network, from a copy of this repository that is not installed:
#   bash benchmarks/gpu.sh OUT_DIR [gpu.py options...]
# The wheels in .whl (pydantic and what it needs, absent there) go to a private folder first; the results
# (gpu.json), the whole log (gpu.log) and nvidia-smi's report land in OUT_DIR. $PYTHON picks the interpreter
# (default: the first of python3, python that imports torch).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/h200}
shift || true
mkdir -p "$out"
python=
for candidate in ${PYTHON:-} python3 python; do
    if "$candidate" -c 'import torch' > /dev/null 2>&1; then python=$candidate; break; fi
done
[ -n "$python" ] || { echo "gpu.sh: no python here imports torch (set PYTHON)" >&2; exit 2; }
site=${XCIT_GPU_SITE:-/tmp/site}
if compgen -G '.whl/*.whl' > /dev/null; then
    # a wheel is a zip laid out for site-packages: where pip is missing, unpacking it is the install
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl 2> /dev/null \
        || "$python" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
            "$site" .whl/*.whl \
        || { echo "gpu.sh: could not install the wheels in .whl into $site" >&2; exit 2; }
    export PYTHONPATH="$site:src${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt"
PYTHONUNBUFFERED=1 "$python" benchmarks/gpu.py --out "$out" "$@" 2>&1 | tee "$out/gpu.log"
exit "${PIPESTATUS[0]}"
