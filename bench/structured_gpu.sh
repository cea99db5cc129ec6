#!/usr/bin/env bash
# bench/structured.py on a GPU host, one command: grammar compile p50/p99 over the schema suite, mask time
# per step at batch 1 / 64 / 256, and output tok/s with a JSON schema against unconstrained at
# concurrency 64 on one `fenwick serve` (the random ~259 M model of bench/serve_h200.sh, made if missing).
#
# The device image lacks the web stack and llguidance: carry them as wheels in .whl (once, here):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl llguidance==1.9.1 fastapi==0.165.0 starlette==1.10.0 \
#     uvicorn==0.54.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection \
#     typing-extensions prometheus-client h11 click anyio sniffio idna httpx httpcore certifi
# then `bash bench/structured_gpu.sh` with carry [".whl"]; results in $OUT/structured.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/structured}
MODEL_DIR=${MODEL_DIR:-/tmp/fenwick-250m}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site-fenwick .
export PYTHONPATH="/tmp/site-fenwick:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
python3 bench/structured.py --model "$MODEL_DIR" --make-model --device "$DEVICE" --out "$OUT/structured.json" \
    "$@" 2>&1 | tee "$OUT/structured.log"
