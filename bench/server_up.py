"""Waiting for a `fenwick serve` that a benchmark started: shared by the serving benchmarks."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: str | Path) -> None:
    """Return once GET {url}/health answers 200; SystemExit (pointing at the server's log) if the process
    exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"fenwick serve exited ({proc.returncode}): see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"fenwick serve not healthy in {timeout} s: see {log}")
        time.sleep(0.5)
