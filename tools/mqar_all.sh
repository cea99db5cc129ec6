#!/usr/bin/env bash
# MQAR for lambda_mode mlp, linear and none: train the three small models in parallel on one device,
# evaluate each through LLM.generate at every length, and write the table.
#
#   tools/mqar_all.sh OUT [extra `tools.mqar train` flags, applied to all three]
#
# Model directories and logs go under WORK (default runs/mqar). OUT receives few files, as the
# device's $OUT needs: mqar_table.md, mqar_results.json (the three eval results) and mqar.log.
# Environment: STEPS (default 4000), TRAIN_BUDGET / EVAL_BUDGET seconds per model (defaults 150 / 100),
# LENS (default 256,...,16384), EXAMPLES per length (default 256), DEVICE (default auto), WORK,
# PYTHON (default python3).
set -euo pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${1:?usage: tools/mqar_all.sh OUT [tools.mqar train flags...]}
shift
WORK=${WORK:-runs/mqar}
STEPS=${STEPS:-4000}
TRAIN_BUDGET=${TRAIN_BUDGET:-150}
EVAL_BUDGET=${EVAL_BUDGET:-100}
LENS=${LENS:-256,512,1024,2048,4096,8192,16384}
EXAMPLES=${EXAMPLES:-256}
DEVICE=${DEVICE:-auto}
mkdir -p "$OUT" "$WORK"
OUT=$(realpath "$OUT")
WORK=$(realpath "$WORK")
cd "$(dirname "$0")/.."
start=$(date +%s)

pipeline() {  # mode: train then eval, all output to WORK/mode.log
    local mode=$1
    shift
    "$PY" -m fenwick_llm.tools.mqar train --out "$WORK/$mode" --lambda-mode "$mode" --steps "$STEPS" \
        --time-budget "$TRAIN_BUDGET" --device "$DEVICE" "$@" &&
    "$PY" -m fenwick_llm.tools.mqar eval --model "$WORK/$mode" --out "$WORK/$mode/eval.json" --lens "$LENS" \
        --examples "$EXAMPLES" --budget "$EVAL_BUDGET" --device "$DEVICE"
}

declare -A pids=()
for mode in mlp linear none; do
    pipeline "$mode" "$@" >"$WORK/$mode.log" 2>&1 &
    pids[$mode]=$!
    echo "[mqar_all] started $mode (pid ${pids[$mode]}), log $WORK/$mode.log"
done
while kill -0 "${pids[@]}" 2>/dev/null; do
    sleep 30
    for mode in mlp linear none; do
        line=$(tr '\r' '\n' <"$WORK/$mode.log" | grep -a -E '^\[' | tail -n 1 || true)
        echo "[mqar_all] +$(( $(date +%s) - start ))s $mode: ${line:-(starting)}"
    done
done
fail=0
for mode in mlp linear none; do
    if ! wait "${pids[$mode]}"; then
        echo "[mqar_all] FAILED: $mode; the end of its log:" >&2
        tail -n 30 "$WORK/$mode.log" >&2
        fail=1
    fi
done
for mode in mlp linear none; do
    echo "===== $mode ====="
    tr '\r' '\n' <"$WORK/$mode.log" | grep -a -E '^\[|Error|error' || true
done >"$OUT/mqar.log"

# the table and results cover whichever models finished; the exit status tells if any did not
evals=()
for mode in mlp linear none; do
    if [[ -f $WORK/$mode/eval.json ]]; then evals+=("$WORK/$mode/eval.json"); fi
done
if (( ${#evals[@]} )); then
    "$PY" -m fenwick_llm.tools.mqar table "${evals[@]}" | tee "$OUT/mqar_table.md" || fail=1
fi
"$PY" - "$WORK" "$OUT" <<'EOF' || fail=1
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {}
for m in ("mlp", "linear", "none"):
    res[m] = {name: json.loads((work / m / f).read_text()) for name, f in
              (("train", "train_report.json"), ("eval", "eval.json")) if (work / m / f).is_file()}
(out / "mqar_results.json").write_text(json.dumps(res, indent=2) + "\n")
EOF
echo "[mqar_all] done in $(( $(date +%s) - start )) s"
exit $fail
