#!/usr/bin/env bash
# Serving benchmark on one H200, one command (~8 minutes): a random-weight ~259 M model (hidden 768,
# 24 layers, H = 24, K = 128, V = 64, λ-MLP), `fenwick serve` on 127.0.0.1, bench/serve.py at concurrency
# 1, 16, 64 and 256 with 1024 input and 256 output tokens, results and plots under $OUT, server stopped.
#
# The device image lacks the server's web stack: carry it as wheels (once, here, in the repo root):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.13.4 pydantic-core==2.46.4 \
#     annotated-types typing-inspection opentelemetry-api typing-extensions
# then run `bash bench/serve_h200.sh` with carry [".whl"]. docs/benchmarks.md (## Serving) has the numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/serve-h200}
PORT=${PORT:-8000}
MODEL_DIR=${MODEL_DIR:-/tmp/fenwick-250m}
CONCURRENCY=${CONCURRENCY:-"1 16 64 256"}
INPUT_LEN=${INPUT_LEN:-1024}
OUTPUT_LEN=${OUTPUT_LEN:-256}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu with a small MODEL_DIR and CONCURRENCY: a smoke test off the GPU
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import fastapi, uvicorn, pydantic, httpx, matplotlib, torch
assert '$DEVICE' == 'cpu' or torch.cuda.is_available()" \
    || { echo "missing packages or no GPU: see the header of $0"; exit 1; }

t0=$SECONDS
[ -f "$MODEL_DIR/config.json" ] || python3 -m fenwick_llm.tools.make_random_model --hidden 768 --layers 24 --out "$MODEL_DIR" \
    || exit 1
python3 bench/state_memory.py --config "$MODEL_DIR/config.json" >"$OUT/state_memory.md"
VOCAB=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$MODEL_DIR/config.json")
echo "model ready after $((SECONDS - t0)) s"

SERVER=(python3 -m fenwick_llm.server serve --model "$MODEL_DIR" --host 127.0.0.1 --port "$PORT" --device "$DEVICE"
        --dtype bfloat16 --max-num-seqs 256 --max-model-len 2048)
echo "server: ${SERVER[*]}" | tee "$OUT/commands.txt"
"${SERVER[@]}" >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
stop_server() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        for _ in $(seq 70); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL "$SERVER_PID" 2>/dev/null
    fi
}
trap stop_server EXIT

for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited"; tail -40 "$OUT/server.log"; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "server not healthy"; tail -40 "$OUT/server.log"; exit 1; }
echo "server healthy after $((SECONDS - t0)) s"

# shellcheck disable=SC2086  # CONCURRENCY is a list of numbers
CLIENT=(python3 bench/serve.py --base-url "http://127.0.0.1:$PORT" --vocab-size "$VOCAB"
        --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --max-concurrency $CONCURRENCY --prompts-per-concurrency 4 --num-prompts 8
        --num-warmups 4 --max-duration "${MAX_DURATION:-60}" --request-timeout 150 --result-dir "$OUT")
echo "client: ${CLIENT[*]}" | tee -a "$OUT/commands.txt"
timeout 450 "${CLIENT[@]}" 2>&1 | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >>"$OUT/commands.txt" 2>&1
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^fenwick_(state|num_requests|iteration_tokens_(sum|count))' \
    >>"$OUT/commands.txt"
echo "done after $((SECONDS - t0)) s (client exit $status)"
exit "$status"
