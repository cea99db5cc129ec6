#!/usr/bin/env bash
# Make a Docker engine answer on this machine, for tests/test_docker_image.py (.ci/run calls this as root).
#
#   docker/start-engine.sh      prints the PID of the dockerd it started (nothing if one already answered)
#
# Installs Debian's docker.io (engine, containerd, runc and a client that builds with the engine's BuildKit)
# and debootstrap (docker/build-local.sh makes its base image with it) where they are missing, then starts
# dockerd in the background. Exits non-zero, saying why, where no engine can run.
set -euo pipefail

log_dir="${FENWICK_DOCKERD_LOG_DIR:-/tmp/fenwick-dockerd}"
mkdir -p "$log_dir"

client=docker
[[ -x /usr/bin/docker ]] && client=/usr/bin/docker
if "$client" info >/dev/null 2>&1; then
    exit 0
fi

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    if [[ $(id -u) != 0 ]]; then
        echo "start-engine: dockerd or debootstrap is missing and installing them needs root" >&2
        exit 1
    fi
    echo "start-engine: apt-get install docker.io debootstrap" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends docker.io debootstrap; } \
        >"$log_dir/apt.log" 2>&1 || { tail -n 20 "$log_dir/apt.log" >&2; exit 1; }
fi
client=/usr/bin/docker

dockerd >"$log_dir/dockerd.log" 2>&1 </dev/null &
pid=$!
for _ in $(seq 60); do
    if "$client" info >/dev/null 2>&1; then
        echo "start-engine: dockerd answers, $SECONDS s after this script started" >&2
        echo "$pid"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        break
    fi
    sleep 0.5
done
echo "start-engine: dockerd did not answer in 30 s; the end of $log_dir/dockerd.log:" >&2
tail -n 20 "$log_dir/dockerd.log" >&2
kill "$pid" 2>/dev/null || true
exit 1
