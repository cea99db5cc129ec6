"""`fenwick serve`'s process layout (server/launcher.py), for real: two API servers on one port in front of
the engine core's process. Structured outputs and prefix-cache hits whichever API server answers; streams,
one /metrics view, aborts that free slots, SIGTERM's drain; an API server's death leaves the rest serving;
the core's death ends every stream and the server exits 1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_utils import ServerProcess, assert_error, metric, parse_sse

FLAGS = "--device cpu --max-num-seqs 8 --max-model-len 512 --api-server-count 2".split()
ENGINE_METRICS = ("fenwick_generation_tokens_total", "fenwick_prompt_tokens_total",
                  "fenwick_e2e_request_latency_seconds_count", "fenwick_state_slots_used")


def pids(server: ServerProcess) -> tuple[int, list[int]]:
    """(the engine core's pid, the live API servers' pids), from the launcher's log."""
    text = server.log_path.read_text(errors="replace")
    core = int(re.findall(r"engine core: pid (\d+)", text)[-1])
    api = {int(i): int(p) for i, p in re.findall(r"API server (\d+): pid (\d+)", text)}
    return core, [p for p in api.values() if os.path.exists(f"/proc/{p}")]


def wait_for(url: str, check: Any, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        if check(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


async def stream(client: httpx.AsyncClient, i: int, max_tokens: int, leave: bool = False) -> list[Any] | None:
    body = {"prompt": f"Stream {i}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        if leave:
            async for _ in r.aiter_lines():
                return None
        return parse_sse("".join([t async for t in r.aiter_text()]))


@pytest.fixture(scope="module")
def two(tiny_model_dir: Path) -> Any:
    """Shared by the first two tests; the second ends it with SIGTERM."""
    with ServerProcess(["--model", str(tiny_model_dir), *FLAGS]) as server:
        yield server


@pytest.fixture
def fresh(tiny_model_dir: Path) -> Any:
    with ServerProcess(["--model", str(tiny_model_dir), *FLAGS]) as server:
        yield server


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"]}


def test_structured_outputs_and_prefix_cache_hits_across_api_servers(two: ServerProcess) -> None:
    """Each API server compiles a request's grammar (a 400 for one that cannot compile), the core enforces
    it; the core's prefix cache serves requests of either API server, and cached_tokens reaches the
    response; /metrics counts both once."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chat = {"messages": [{"role": "user", "content": "Who?"}], "max_tokens": 100, "temperature": 1.0}
    kind = 'kind="json_schema"'
    with httpx.Client(base_url=two.url, timeout=120, headers={"connection": "close"}) as http:
        before = http.get("/metrics").text
        for seed in range(4):  # a new connection each: either API server answers
            r = http.post("/v1/chat/completions", json={**chat, "seed": seed, "response_format": fmt})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            person = json.loads(choice["message"]["content"])
            assert choice["finish_reason"] == "stop" and set(person) == {"name", "age"}
            assert isinstance(person["name"], str) and 0 <= person["age"] <= 99
            bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strin"}}}
            assert_error(http.post("/v1/chat/completions", json={**chat, "response_format": bad}), 400,
                         "response_format")
        prompt = list(range(40, 104))
        mid = wait_for(two.url, lambda t: metric(t, "fenwick_structured_requests_total", kind) - metric(
            before, "fenwick_structured_requests_total", kind) == 4)
        first = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        again = http.post("/v1/completions", json={"prompt": [*prompt, 3], "max_tokens": 2}).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt)
        after = wait_for(two.url, lambda t: metric(t, "fenwick_prefix_cache_hits_total")
                         - metric(mid, "fenwick_prefix_cache_hits_total") >= len(prompt))
    assert metric(mid, "fenwick_structured_requests_total", kind) - metric(
        before, "fenwick_structured_requests_total", kind) == 4
    assert metric(after, "fenwick_prefix_cache_hits_total") - metric(
        mid, "fenwick_prefix_cache_hits_total") == len(prompt)
    assert metric(after, "fenwick_prefix_cache_bytes", 'tier="device"') > 0


async def test_an_api_server_dies_and_the_rest_serve_on(two: ServerProcess) -> None:
    core, api = pids(two)
    async with httpx.AsyncClient(base_url=two.url, timeout=120) as client:
        running = [asyncio.create_task(stream(client, i, 400)) for i in range(8)]
        await asyncio.to_thread(wait_for, two.url, lambda t: metric(t, "fenwick_num_requests_running") == 8)
        held = connections(two.port, api)
        victim = max(api, key=lambda p: held[p])
        os.kill(victim, signal.SIGKILL)
        done, _ = await asyncio.wait(running, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert done and all(isinstance(t.exception(), httpx.HTTPError) for t in done)  # its streams were cut
        for task in running:
            task.cancel()  # the other server's streams: their clients go away
        await asyncio.gather(*running, return_exceptions=True)
        while gone(victim) is False:  # its listening socket closes as it exits: then none can reach it
            await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=two.url, timeout=120) as client:  # no connection to the dead one
        for i in range(6):  # the other takes every new request at once
            r = await client.post("/v1/completions", json={"prompt": f"after {i}", "max_tokens": 4},
                                  headers={"connection": "close"})
            assert r.status_code == 200
    text = wait_for(two.url, lambda t: metric(t, "fenwick_state_slots_used") == 0
                    and metric(t, "fenwick_num_requests_running") == 0)
    assert metric(text, "fenwick_state_slots_used") == 0  # the core aborted the dead server's requests
    deadline = time.monotonic() + 60
    while started(two) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)  # a replacement starts and serves (the next test counts on both)
    assert len(pids(two)[1]) == 2 and pids(two)[0] == core and two.proc.poll() is None


async def test_two_api_servers_stream_share_metrics_free_slots_and_drain(two: ServerProcess) -> None:
    _, api = pids(two)
    assert len(api) == 2
    before = httpx.get(f"{two.url}/metrics").text
    limits = httpx.Limits(max_connections=40, max_keepalive_connections=0)  # connections spread over both
    async with httpx.AsyncClient(base_url=two.url, timeout=120, limits=limits) as client:
        streams = asyncio.gather(*(stream(client, i, 200 if i % 3 == 0 else 32, leave=i % 3 == 0)
                                   for i in range(24)))
        await asyncio.to_thread(wait_for, two.url, lambda t: metric(t, "fenwick_num_requests_running") >= 8)
        held = connections(two.port, api)
        results = await streams
    assert all(held[p] > 0 for p in api), held  # SO_REUSEPORT spreads connections over both
    for i, events in enumerate(results):
        if i % 3:
            assert events is not None and events[-1] == "[DONE]"
            assert events[-2]["usage"]["completion_tokens"] == 32
    def delta(text: str, name: str, labels: str = "") -> float:
        return metric(text, name, labels) - metric(before, name, labels)

    aborted, length = 'finish_reason="abort"', 'finish_reason="length"'
    text = wait_for(two.url, lambda t: metric(t, "fenwick_state_slots_used") == 0
                    and delta(t, "fenwick_request_success_total", aborted) == 8)
    assert metric(text, "fenwick_state_slots_used") == 0 and metric(text, "fenwick_num_requests_running") == 0
    assert delta(text, "fenwick_request_success_total", length) == 16
    ok = 'path="/v1/completions",status="200"'
    assert delta(text, "fenwick_http_requests_total", ok) == 24  # summed over both API servers
    scrapes = [httpx.get(f"{two.url}/metrics", headers={"connection": "close"}).text for _ in range(8)]
    for name in ENGINE_METRICS:  # one view whichever API server answers
        assert len({metric(t, name) for t in scrapes}) == 1, name
    assert metric(scrapes[0], "fenwick_engine_up") == 1.0

    # SIGTERM with streams running: they finish in full, then everything exits 0
    async with httpx.AsyncClient(base_url=two.url, timeout=120, limits=limits) as client:
        running = [asyncio.create_task(stream(client, i, 60)) for i in range(4)]
        await asyncio.to_thread(wait_for, two.url, lambda t: metric(t, "fenwick_num_requests_running") == 4)
        two.terminate()
        done = await asyncio.gather(*running)
    assert all(e is not None and e[-2]["usage"]["completion_tokens"] == 60 for e in done)
    assert two.proc.wait(timeout=60) == 0, two.output()


def started(server: ServerProcess) -> int:
    """API servers that have started serving, from the launcher's log."""
    return server.log_path.read_text(errors="replace").count("Application startup complete")


def gone(pid: int) -> bool:
    """The process has exited (a zombie until the launcher reaps it, or no longer there)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def connections(port: int, owners: list[int]) -> dict[int, int]:
    """Established connections to `port` held by each of these processes."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01":  # local port, ESTABLISHED
            inodes.add(f"socket:[{f[9]}]")
    return {pid: sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir() if _link(fd) in inodes) for pid in owners}


def _link(fd: Path) -> str | None:
    try:
        return os.readlink(fd)
    except FileNotFoundError:  # closed since the listing (another file the process had open)
        return None


async def test_the_core_dies_and_every_stream_ends_and_the_server_exits_1(fresh: ServerProcess) -> None:
    two = fresh
    core, _ = pids(two)
    async with httpx.AsyncClient(base_url=two.url, timeout=120) as client:
        running = [asyncio.create_task(stream(client, i, 400)) for i in range(6)]
        await asyncio.to_thread(wait_for, two.url, lambda t: metric(t, "fenwick_num_requests_running") == 6)
        killed = time.monotonic()
        os.kill(core, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), 5)
        ended = time.monotonic() - killed
    for r in results:  # an error event then [DONE], or a closed connection; none hangs
        closed = isinstance(r, httpx.HTTPError)
        assert closed or (r[-1] == "[DONE]" and r[-2]["error"]["code"] == "engine_dead"), r
    assert ended < 5.0
    assert two.proc.wait(timeout=10) == 1, two.output()
    assert time.monotonic() - killed < 10.0


def test_api_servers_import_no_torch() -> None:
    """An API server process never loads torch (memory, start-up) and so can never touch the GPU."""
    import subprocess
    import sys

    code = "import sys, fenwick_llm.server.api_server; assert 'torch' not in sys.modules, 'torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
