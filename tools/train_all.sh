#!/usr/bin/env bash
# Train the demo model (lambda_mode mlp) and the same recipe with linear and none, in parallel on one
# device, then print held-out nats/char for the three and pack the results for the trip back.
#
#   tools/train_all.sh TEXT OUT [extra tools.train flags, applied to all three]
#
# Runs are written under WORK (default runs/train_all): WORK/fenwick-shakespeare/ is the demo model
# directory (copy it to models/); WORK/linear and WORK/none keep only their train_report.json (comparison
# runs, not committed); WORK/*.log are the training logs. OUT receives few files, as the device's $OUT
# needs: summary.md / summary.json (the table) and results.tar.part-NN (≤ 15 MiB each) packing all of
# WORK: `cat OUT/results.tar.part-* | tar -x -C DEST`.
# Environment: STEPS (default 600), BUDGET seconds per run (default 240), DEVICE (default auto), WORK,
# PYTHON (default python3).
set -euo pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TEXT=${1:?usage: tools/train_all.sh TEXT OUT [tools.train flags...]}
OUT=${2:?usage: tools/train_all.sh TEXT OUT [tools.train flags...]}
shift 2
[[ -f $TEXT ]] || { echo "train_all: no such text file: $TEXT" >&2; exit 2; }
WORK=${WORK:-runs/train_all}
STEPS=${STEPS:-600}
BUDGET=${BUDGET:-240}
DEVICE=${DEVICE:-auto}
TEXT=$(realpath "$TEXT")
mkdir -p "$OUT" "$WORK"
OUT=$(realpath "$OUT")
WORK=$(realpath "$WORK")
cd "$(dirname "$0")/.."
"$PY" -c "import torch; print('[train_all] torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
start=$(date +%s)

declare -A dirs=([mlp]="$WORK/fenwick-shakespeare" [linear]="$WORK/linear" [none]="$WORK/none")
declare -A pids=()
for mode in mlp linear none; do
    sample=64
    [[ $mode == mlp ]] || sample=0
    "$PY" -m fenwick_llm.tools.train --text "$TEXT" --out "${dirs[$mode]}" --lambda-mode "$mode" --steps "$STEPS" \
        --time-budget "$BUDGET" --device "$DEVICE" --sample-tokens "$sample" "$@" >"$WORK/$mode.log" 2>&1 &
    pids[$mode]=$!
    echo "[train_all] started $mode (pid ${pids[$mode]}) → ${dirs[$mode]}, log $WORK/$mode.log"
done
# progress: the last result / eval line of each log, every 30 s
while kill -0 "${pids[@]}" 2>/dev/null; do
    sleep 30
    for mode in mlp linear none; do
        line=$(tr '\r' '\n' <"$WORK/$mode.log" | grep -a -E '^\[' | tail -n 1 || true)
        echo "[train_all] +$(( $(date +%s) - start ))s $mode: ${line:-(starting)}"
    done
done
fail=0
for mode in mlp linear none; do
    if ! wait "${pids[$mode]}"; then
        echo "[train_all] FAILED: $mode; the end of its log:" >&2
        tail -n 30 "$WORK/$mode.log" >&2
        fail=1
    fi
done
# summary and packing run whatever happened, so that finished runs come back; the exit status tells
"$PY" - "$WORK" "$OUT" <<'EOF' || fail=1
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for mode, d in (("mlp", "fenwick-shakespeare"), ("linear", "linear"), ("none", "none")):
    path = work / d / "train_report.json"
    if not path.is_file():
        print(f"[train_all] no report for {mode}: {path}")
        continue
    r = json.loads(path.read_text())
    rows.append({"lambda_mode": mode, "heldout_nats_per_char": r["heldout_nats_per_char"],
                 "heldout_loss_per_token": r["heldout_loss_per_token"], "best_step": r["best_step"],
                 "steps_run": r["steps_run"], "train_seconds": r["train_seconds"],
                 "stopped_by_budget": r["stopped_by_budget"], "params": r["params"], "command": r["command"]})
for where in (work, out):
    (where / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
md = ["| lambda_mode | held-out nats/char | nats/token | best step / steps run | train s | params |",
      "| --- | --- | --- | --- | --- | --- |"]
md += [f"| {r['lambda_mode']} | {r['heldout_nats_per_char']:.4f} | {r['heldout_loss_per_token']:.4f} | "
       f"{r['best_step']} / {r['steps_run']}{' (budget)' if r['stopped_by_budget'] else ''} | "
       f"{r['train_seconds']:.0f} | {r['params']:,} |" for r in rows]
for where in (work, out):
    (where / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
rm -f "$WORK"/linear/model.safetensors "$WORK"/none/model.safetensors
ls -la "$WORK/fenwick-shakespeare" || true
rm -f "$OUT"/results.tar.part-*
(cd "$WORK" && tar -cf - --ignore-failed-read fenwick-shakespeare linear none summary.json summary.md \
    mlp.log linear.log none.log 2>/dev/null || true) | split -b 15M -d - "$OUT/results.tar.part-"
ls -la "$OUT"
echo "[train_all] done in $(( $(date +%s) - start )) s; unpack with: cat results.tar.part-* | tar -x"
exit $fail
