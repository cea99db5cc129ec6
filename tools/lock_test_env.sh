#!/usr/bin/env bash
# Refresh constraints.txt: the locked test environment that .ci/run and the README's test command install
# from, so that every fresh machine resolves what CI resolved. It resolves the dev and peer extras (and
# the SDK) in a brand-new virtualenv and freezes it. Run it after changing a dependency in pyproject.toml
# or clients/python/pyproject.toml, then run the README's test command against the new file.
#
#   tools/lock_test_env.sh            # writes constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q "torch==2.13.0"  # the CPU build; an unpinned torch pulls a multi-GB CUDA build
"${pip[@]}" install -q -e ".[dev,peer]" -e ./clients/python
{
    echo "# The locked test environment (CPU): tools/lock_test_env.sh writes it; see docs/development.md."
    echo "# Runtime requirements stay ranges in pyproject.toml; this file pins what CI and the tests install."
    "${pip[@]}" freeze --exclude-editable | sed -e 's/+cpu$//' | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
