#!/usr/bin/env bash
# The adaptive-decay study in one command (docs/adaptive-decay.md): on one H100, ≈ 7 minutes.
#
#   bash tools/decay_study.sh OUT TEXT [more tools.decay_study flags, e.g. --preset smoke --device cpu]
#
# OUT receives 8 files (study.json, mqar.json, copy.json, lm.json, summary.md, mqar.png, copy.png,
# lm.png); TEXT is the language-modelling text (tinyshakespeare), read where it lies. Runs without an
# installed package: where fenwick_llm does not import, a symlink tree in /tmp maps the repository's
# folders to fenwick_llm.* as pyproject's package-dir does, and Python runs from there (in the
# repository root, its fenwick_llm/ folder would shadow the tree). FENWICK_SYMLINK_ROOT=1 forces it.
set -euo pipefail
OUT=${1:?usage: tools/decay_study.sh OUT TEXT [tools.decay_study flags]}
TEXT=${2:?usage: tools/decay_study.sh OUT TEXT [tools.decay_study flags]}
shift 2
OUT=$(realpath -m "$OUT")
TEXT=$(realpath -m "$TEXT")
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
cd /tmp
if [[ ${FENWICK_SYMLINK_ROOT:-0} == 1 ]] || ! "$PY" -c "import fenwick_llm.tools.decay_study" 2>/dev/null; then
    root=$(mktemp -d /tmp/fenwick_root.XXXXXX)
    mkdir "$root/fenwick_llm"
    ln -s "$REPO/fenwick_llm/__init__.py" "$root/fenwick_llm/__init__.py"
    for d in engine kernels server tools models; do ln -s "$REPO/$d" "$root/fenwick_llm/$d"; done
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    cd "$root"
fi
export PYTHONUNBUFFERED=1
"$PY" -c "import fenwick_llm.tools.decay_study as m, torch
print('[decay_study.sh]', m.__file__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec "$PY" -m fenwick_llm.tools.decay_study --out "$OUT" --text "$TEXT" "$@"
