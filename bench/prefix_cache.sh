#!/usr/bin/env bash
# Prefix cache on vs off in one command (issue 23; ~6 minutes on an H100 or H200). A random-weight ~259 M
# model (hidden 768, 24 layers, λ-MLP) with a word-level tokenizer (its replies re-tokenize to the tokens
# generated, as a trained model's mostly do: tools/make_random_model.py), `fenwick serve` started twice on
# 127.0.0.1 -- prefix caching on, then off, all else equal -- and against each:
#   multi-turn  32 conversations x 8 turns of 500 user + 640 reply tokens through chat completions, each
#               turn re-sending the history (8.5 k prompt tokens by turn 8; with the cache a turn prefills
#               its new message, one prompt chunk), 32 at once, logprobs kept to spot near-ties;
#   shared      1000 requests of one 4096-token system prompt + 128 tokens, 32 output tokens, 256 at once;
#   random      256 prompts of 1024 random tokens, 256 output tokens, 64 at once (no reuse);
# then bench/prefix_cache_report.py compares the runs against the issue's targets into $OUT/report.md.
#
# The device image lacks the server's web stack: carry it as wheels (see bench/serve_h200.sh), then
#   WHEELS=.whl bash bench/prefix_cache.sh          with carry [".whl"]
# MODES=on or MODES=off runs one server only (two calls under a per-command time limit; the report needs
# both in $OUT). DEVICE=cpu with a small MODEL_DIR and the sizes below made small is a smoke test off the
# GPU (tests/test_bench_serve.py runs it so).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/prefix-cache}
PORT=${PORT:-8000}
MODEL_DIR=${MODEL_DIR:-/tmp/fenwick-250m-word}
DEVICE=${DEVICE:-cuda}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-16384}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-256}
SERVER_ARGS=${SERVER_ARGS:-}  # extra `fenwick serve` flags for both runs (e.g. --prefix-cache-gib 8)
MODES=${MODES:-"on off"}
TURNS=${TURNS:-8} TURN_INPUT=${TURN_INPUT:-500} TURN_OUTPUT=${TURN_OUTPUT:-640} CONVERSATIONS=${CONVERSATIONS:-32}
PREFIX=${PREFIX:-4096} PREFIX_SUFFIX=${PREFIX_SUFFIX:-128} PREFIX_OUTPUT=${PREFIX_OUTPUT:-32}
PREFIX_REQUESTS=${PREFIX_REQUESTS:-1000} PREFIX_CONCURRENCY=${PREFIX_CONCURRENCY:-256}
RANDOM_INPUT=${RANDOM_INPUT:-1024} RANDOM_OUTPUT=${RANDOM_OUTPUT:-256} RANDOM_PROMPTS=${RANDOM_PROMPTS:-256}
RANDOM_CONCURRENCY=${RANDOM_CONCURRENCY:-64}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}"

WHEELS=${WHEELS:-}  # a folder of wheels to install first (the device's missing web stack: WHEELS=.whl)
if [ -n "$WHEELS" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/site"
fi
python3 -c "import fastapi, uvicorn, pydantic, httpx, matplotlib, torch
assert '$DEVICE' == 'cpu' or torch.cuda.is_available()" \
    || { echo "missing packages or no GPU: see the header of bench/serve_h200.sh"; exit 1; }
# this checkout's code under its import root (links), installed or not, ahead of any installed copy
ROOT=/tmp/fenwick-import-root-$$
rm -rf "$ROOT" && mkdir -p "$ROOT/fenwick_llm" && ln -s "$PWD/fenwick_llm/__init__.py" "$ROOT/fenwick_llm/"
for d in engine kernels server tools models; do ln -s "$PWD/$d" "$ROOT/fenwick_llm/$d"; done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import fenwick_llm.server.cli" || exit 1

t0=$SECONDS
[ -f "$MODEL_DIR/config.json" ] || python3 -m fenwick_llm.tools.make_random_model --hidden 768 --layers 24 --tokenizer word \
    --out "$MODEL_DIR" || exit 1
VOCAB=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$MODEL_DIR/config.json")
echo "model ready after $((SECONDS - t0)) s" | tee -a "$OUT/commands.txt"

SERVER_PID=
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        for _ in $(seq 70); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL "$SERVER_PID" 2>/dev/null
    fi
    SERVER_PID=
}
trap stop_server EXIT

status=0
for mode in $MODES; do
    flag=--enable-prefix-caching; [ "$mode" = off ] && flag=--no-enable-prefix-caching
    # shellcheck disable=SC2206  # SERVER_ARGS is a list of flags
    SERVER=(python3 -m fenwick_llm.server serve --model "$MODEL_DIR" --host 127.0.0.1 --port "$PORT" --device "$DEVICE"
            --dtype bfloat16 --max-num-seqs "$MAX_NUM_SEQS" --max-model-len "$MAX_MODEL_LEN" --max-waiting 2048
            "$flag" $SERVER_ARGS)
    [ "$DEVICE" = cpu ] && SERVER[${#SERVER[@]}]=--dtype=float32
    echo "server ($mode): ${SERVER[*]}" | tee -a "$OUT/commands.txt"
    "${SERVER[@]}" >"$OUT/server-$mode.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 240); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited"; tail -40 "$OUT/server-$mode.log"; exit 1; }
        sleep 1
    done
    echo "server ($mode) healthy after $((SECONDS - t0)) s"
    CLIENT=(python3 bench/serve.py --base-url "http://127.0.0.1:$PORT" --vocab-size "$VOCAB" --num-warmups 2
            --request-timeout 300 --save-requests)
    runs=(
        "multi-turn --dataset multi-turn --num-turns $TURNS --input-len $TURN_INPUT --output-len $TURN_OUTPUT
         --max-concurrency $CONVERSATIONS"
        "shared --dataset shared-prefix --prefix-len $PREFIX --input-len $PREFIX_SUFFIX --output-len $PREFIX_OUTPUT
         --num-prompts $PREFIX_REQUESTS --max-concurrency $PREFIX_CONCURRENCY --num-warmups 0"
        "random --input-len $RANDOM_INPUT --output-len $RANDOM_OUTPUT --num-prompts $RANDOM_PROMPTS
         --max-concurrency $RANDOM_CONCURRENCY"
    )
    for run in "${runs[@]}"; do
        # shellcheck disable=SC2086  # a run is its name and its flags
        set -- $run
        name=$1; shift
        echo "client ($mode, $name): ${CLIENT[*]} $* --result-dir $OUT/$mode/$name" | tee -a "$OUT/commands.txt"
        timeout 600 "${CLIENT[@]}" "$@" --result-dir "$OUT/$mode/$name" 2>&1 | tee "$OUT/$mode-$name.log" \
            || status=1
    done
    curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^fenwick_(prefix_cache|prompt_tokens|state_slots)' \
        >"$OUT/metrics-$mode.txt"
    stop_server
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv >>"$OUT/commands.txt"
if [ -d "$OUT/on" ] && [ -d "$OUT/off" ]; then
    python3 bench/prefix_cache_report.py "$OUT" | tee "$OUT/report.md" || status=1
fi
echo "done after $((SECONDS - t0)) s"
exit "$status"
