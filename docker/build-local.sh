#!/usr/bin/env bash
# Build docker/Dockerfile on a machine that reaches Debian's archive and PyPI but no image registry.
#
#   docker/build-local.sh [cpu|cuda] [docker build options...]      (from anywhere; as root or a docker user)
#
# 1. The base image: Debian bookworm with python3 and python3-venv, made by debootstrap and `docker import`
#    (once; kept as $FENWICK_BASE_IMAGE). It stands in for python:3.11-slim-bookworm (CPU_IMAGE) or, for
#    `cuda`, for nvidia/cuda (CUDA_IMAGE): that checks every stage after the CUDA base, not CUDA itself.
# 2. A package index: the wheels that torch==$TORCH_VERSION and the project need, taken by the host's pip
#    and served on 127.0.0.1; the build runs on the host network to reach it (PIP_INDEX_URL, TORCH_CPU_INDEX).
# 3. `docker build` of the Dockerfile as it is, with only those build arguments changed.
#
# Environment: FENWICK_IMAGE (tag; fenwick:cpu or fenwick:cuda-check), FENWICK_BASE_IMAGE
# (fenwick-base:bookworm), FENWICK_DOCKER_CACHE (wheels and index; ~/.cache/fenwick-docker),
# FENWICK_INDEX_PORT (3141), DEBIAN_MIRROR, TORCH_VERSION (2.13.0), PYTHON (python3, with pip), DOCKER (a
# client that builds with BuildKit).
# With registry access none of this is needed: `docker build` / `docker compose build` as usual.
set -euo pipefail

variant="${1:-cpu}"
[[ $# -gt 0 ]] && shift
case "$variant" in
    cpu) image="${FENWICK_IMAGE:-fenwick:cpu}" ;;
    cuda) image="${FENWICK_IMAGE:-fenwick:cuda-check}" ;;
    *) echo "usage: $0 [cpu|cuda] [docker build options...]" >&2; exit 2 ;;
esac
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base="${FENWICK_BASE_IMAGE:-fenwick-base:bookworm}"
cache="${FENWICK_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fenwick-docker}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
torch_version="${TORCH_VERSION:-2.13.0}"
python="${PYTHON:-python3}"

# BuildKit builds only the stages the target needs (the classic builder would pull the other base too).
# A client without the buildx plugin cannot use it; Debian's docker.io client talks to the engine's own.
if [[ -z "${DOCKER:-}" ]]; then
    DOCKER=docker
    if ! docker buildx version >/dev/null 2>&1 && [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; fi
fi
export DOCKER_BUILDKIT=1

log() { printf '[build-local] %s\n' "$*" >&2; }

make_base() {
    local root
    root="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand now: the trap must remove this call's folder
    trap "rm -rf '$root'; trap - RETURN" RETURN
    log "debootstrap bookworm into $root ($mirror)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
        || { tail -n 30 "$cache/debootstrap.log" >&2; return 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc \
        "$root"/usr/share/man "$root"/usr/share/locale
    log "docker import as $base"
    tar -C "$root" -c . | "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
}

make_index() {
    local pyver=$1 wheels="$cache/wheels" index="$cache/index" stamp
    # the same requirements as the last index: reuse it (pip download re-resolves against PyPI: ~20 s)
    stamp="$(cat "$repo/pyproject.toml" <(echo "torch==$torch_version python$pyver") | sha256sum)"
    stamp="${stamp:0:16}"
    if [[ -f "$index/stamp" && "$(cat "$index/stamp")" == "$stamp" ]]; then
        log "package index: the one in $index (same pyproject.toml, torch and Python)"
        return
    fi
    mkdir -p "$wheels"
    log "wheels for torch==$torch_version and $repo (Python $pyver) into $wheels"
    "$python" -m pip download --quiet --dest "$wheels" --only-binary=:all: --python-version "$pyver" \
        "torch==$torch_version" "$repo" "setuptools>=68" wheel
    # PEP 503 layout: one folder per normalised project name; http.server's listing is the project page
    rm -rf "$index" && mkdir -p "$index/simple"
    local whl name
    for whl in "$wheels"/*.whl; do
        name="$(basename "$whl" | cut -d- -f1 | tr '[:upper:]_.' '[:lower:]--')"
        mkdir -p "$index/simple/$name"
        ln -f "$whl" "$index/simple/$name/" 2>/dev/null || cp "$whl" "$index/simple/$name/"
    done
    echo "$stamp" >"$index/stamp"
}

serve_index() {
    # the index URL is a build argument: the same port each time keeps Docker's layer cache valid
    local port="${FENWICK_INDEX_PORT:-3141}"
    # SO_REUSEADDR as http.server sets it: the last build's connections may still be in TIME_WAIT
    if ! "$python" -c "import socket as m; s = m.socket(); s.setsockopt(m.SOL_SOCKET, m.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', $port))" 2>/dev/null; then
        port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"
        log "port ${FENWICK_INDEX_PORT:-3141} is taken: the index is on $port, so cached pip layers rebuild"
    fi
    "$python" -m http.server --bind 127.0.0.1 --directory "$cache/index" "$port" >"$cache/http.log" 2>&1 &
    index_pid=$!
    trap 'kill "$index_pid" 2>/dev/null || true' EXIT
    local i
    for i in $(seq 50); do
        "$python" -c "import urllib.request as r; r.urlopen('http://127.0.0.1:$port/simple/', timeout=1)" \
            2>/dev/null && break
        [[ $i == 50 ]] && { log "the index did not start: $(cat "$cache/http.log")"; return 1; }
        sleep 0.1
    done
    index_url="http://127.0.0.1:$port/simple"
}

mkdir -p "$cache"
if ! "$DOCKER" image inspect "$base" >/dev/null 2>&1; then
    start=$SECONDS
    make_base
    log "base image $base made in $((SECONDS - start)) s"
fi
pyver="$("$DOCKER" run --rm --network none "$base" python3 -c 'import sys; print(*sys.version_info[:2], sep=".")')"
start=$SECONDS
make_index "$pyver"
log "package index ready in $((SECONDS - start)) s"
serve_index

start=$SECONDS
if [[ "$variant" == cpu ]]; then
    base_args=(--build-arg "CPU_IMAGE=$base" --build-arg "TORCH_CPU_INDEX=$index_url")
else
    base_args=(--build-arg "CUDA_IMAGE=$base")
fi
log "docker build ($variant) -> $image"
"$DOCKER" build --network host -f "$repo/docker/Dockerfile" \
    --build-arg "VARIANT=$variant" "${base_args[@]}" --build-arg "PIP_INDEX_URL=$index_url" \
    --build-arg "TORCH_VERSION=$torch_version" -t "$image" "$@" "$repo"
log "built $image in $((SECONDS - start)) s, $("$DOCKER" image inspect -f '{{.Size}}' "$image") bytes"
