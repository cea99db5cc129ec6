#!/usr/bin/env bash
# HTTP against offline on one GPU, one command (~8 minutes with the defaults): the random-weight 259 M model
# of bench/serve_h200.sh, LLM.generate and then `fenwick serve` (once per API server count) on the same
# workload (1024 random prompt tokens, 256 output tokens, greedy, EOS ignored, max_num_seqs 256,
# max_model_len 2048), and the HTTP / offline table per concurrency (bench/http_vs_offline.py). Then,
# with FAULTS=1, the 512-stream soak (a third disconnecting) and the kill -9 of the core
# (bench/serve_faults.py); with FAULTS=only, those alone.
#
# The device image lacks the server's web stack and transport: carry them as wheels (once, here, in the
# repo root):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types typing-inspection annotated-doc pyzmq==27.3.0 msgspec==0.23.0
# then run `bash bench/http_vs_offline.sh` with carry [".whl"]; results (few files) land in $OUT.
# Environment: OUT, MODEL_DIR, CONCURRENCY, API_SERVER_COUNTS (default "1 2"), MAX_DURATION (seconds per
# concurrency level, default 20), INPUT_LEN, OUTPUT_LEN, DEVICE (cpu: a smoke test), FAULTS, OFFLINE (an
# earlier run's offline.json, on the same card and warm machine, to run only the HTTP half, e.g. for
# API_SERVER_COUNTS=4 within the 10-minute limit of one command).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/http-vs-offline}
WORK=${WORK:-/tmp/http-vs-offline}
MODEL_DIR=${MODEL_DIR:-/tmp/fenwick-250m}
CONCURRENCY=${CONCURRENCY:-"1 16 64 256 512"}
API_SERVER_COUNTS=${API_SERVER_COUNTS:-"1 2"}
DEVICE=${DEVICE:-cuda}
FAULTS=${FAULTS:-0}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python3 -c "import fenwick_llm.server.launcher" 2>/dev/null; then  # not installed: the checkout as fenwick_llm
    root=/tmp/fenwick-root
    rm -rf "$root" && mkdir -p "$root/fenwick_llm" && cp fenwick_llm/__init__.py "$root/fenwick_llm/"
    for d in engine kernels server tools models; do ln -s "$PWD/$d" "$root/fenwick_llm/$d"; done
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import fastapi, uvicorn, pydantic, httpx, zmq, msgspec, fenwick_llm.server.launcher, torch
assert '$DEVICE' == 'cpu' or torch.cuda.is_available()" || { echo "missing packages or no GPU: see $0"; exit 1; }

[ -f "$MODEL_DIR/config.json" ] || python3 -m fenwick_llm.tools.make_random_model --hidden 768 --layers 24 \
    --out "$MODEL_DIR" || exit 1
FLAGS=(--model "$MODEL_DIR" --device "$DEVICE" --dtype auto
       --max-num-seqs 256 --max-model-len 2048)
status=0
if [ "$FAULTS" != only ]; then
    reuse=()  # OFFLINE=path/offline.json: the offline half of an earlier run (same card), not run again
    [ -n "${OFFLINE:-}" ] && reuse=(--skip-offline "$OFFLINE")
    # shellcheck disable=SC2086  # lists of numbers
    python3 bench/http_vs_offline.py "${FLAGS[@]}" --input-len "${INPUT_LEN:-1024}" --output-len "${OUTPUT_LEN:-256}" \
        --concurrency $CONCURRENCY --api-server-counts $API_SERVER_COUNTS --max-duration "${MAX_DURATION:-20}" \
        "${reuse[@]}" --result-dir "$WORK" 2>"$OUT/http_vs_offline.log" || status=1
    cp "$WORK/report.md" "$WORK/offline.json" "$OUT/" 2>/dev/null
    for k in $API_SERVER_COUNTS; do cp "$WORK/http-$k/serve.json" "$OUT/serve-$k.json" 2>/dev/null; done
fi
if [ "$FAULTS" != 0 ]; then
    python3 bench/serve_faults.py "${FLAGS[@]}" --result-dir "$WORK/soak" soak --streams 512 --duration 60 \
        >"$OUT/faults.json" 2>"$OUT/faults.log" || status=1
    python3 bench/serve_faults.py "${FLAGS[@]}" --result-dir "$WORK/kill" kill-core --streams 256 \
        >>"$OUT/faults.json" 2>>"$OUT/faults.log" || status=1
    cat "$OUT/faults.json"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >>"$OUT/http_vs_offline.log" 2>&1
exit "$status"
