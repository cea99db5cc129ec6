"""Server test helpers: a real `fenwick serve` process, OpenAI error checks, /metrics and SSE parsing.
(The fake engine for in-process apps is tests/fake_engine.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, output: Callable[[], str], timeout: float = 120.0) -> None:
    """Poll ``url``/health until it answers 200; raise with the server's output if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fenwick serve exited with {proc.returncode}:\n{output()}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"fenwick serve did not become healthy in {timeout}s:\n{output()}")


class ServerProcess:
    """`python -m fenwick_llm.server serve ...` on 127.0.0.1 and a free port, started from a folder
    outside the checkout (as installed); waits on /health; killed by stop() or on leaving its `with`
    block."""

    def __init__(self, args: list[str], startup_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "fenwick_llm.server",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            # as conftest's _one_torch_thread: the engine core beside the other pytest worker on 2 cores
            *([] if "--cpu-threads" in args else ["--cpu-threads", "1"]),
            *args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fenwick-serve-{self.port}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        try:
            self._wait_healthy(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        wait_healthy(self.url, self.proc, self.output, timeout)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# the shared server: 64 slots, a 256-token context (so "prompt too long" is cheap), a 1 MiB body limit
MAIN_SERVER_ARGS = (
    "--served-model-name tiny-shakespeare --device cpu --max-num-seqs 64 --max-model-len 256 "
    "--max-body-bytes 1048576"
).split()


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """One real `fenwick serve` shared by the server test modules (they load this file as a plugin);
    tiny_model_dir is the session's tiny random model from tests/conftest.py."""
    with ServerProcess(["--model", str(tiny_model_dir), *MAIN_SERVER_ARGS]) as proc:
        yield proc


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The response is OpenAI's error object with this status (and param)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from /metrics text (0 when absent)."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def parse_sse(raw: str) -> list[Any]:
    """The data payloads of an SSE body: JSON objects, and the string "[DONE]"."""
    assert raw.endswith("\n\n"), "an SSE body ends with a blank line"
    events: list[Any] = []
    for block in raw.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
