"""A real `fenwick serve` under load: disconnects free slots, metrics move, 401 / 429, SIGTERM drains."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_utils import ServerProcess, metric, parse_sse

KEY = "test-key"


def wait_for_metrics(url: str, check: Any, timeout: float = 15.0) -> str:
    """Poll /metrics until check(text) holds; the last text."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        if check(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


async def test_concurrent_streams_with_disconnects(server: ServerProcess) -> None:
    """50 requests at once; every third client goes away mid-request. The rest finish; slots are freed."""
    before = httpx.get(f"{server.url}/metrics").text
    gone = set(range(0, 50, 3))

    async def one(client: httpx.AsyncClient, i: int) -> list[Any] | None:
        leave = i in gone
        body = {
            "prompt": f"Request {i}: once upon a time",
            "stream": True,
            "ignore_eos": True,
            "max_tokens": 224 if leave else 12,  # nearly fills the 256-token context
            "temperature": 0.8,
            "seed": i,
        }
        if leave and i % 2:  # a non-streaming client that gives up waiting
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json={**body, "stream": False}, timeout=0.3)
            return None
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            if leave:  # a streaming client that goes away after its first chunk
                async for _ in r.aiter_lines():
                    break
                return None
            return parse_sse("".join([t async for t in r.aiter_text()]))

    limits = httpx.Limits(max_connections=60, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(50)))
    for i, events in enumerate(results):
        if i in gone:
            continue
        assert events is not None and events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events[:-1]) >= 1

    aborted_before = metric(before, "fenwick_request_success_total", 'finish_reason="abort"')
    text = wait_for_metrics(
        server.url,
        lambda t: (
            metric(t, "fenwick_state_slots_used") == 0
            and metric(t, "fenwick_request_success_total", 'finish_reason="abort"') - aborted_before
            >= len(gone)
        ),
    )
    assert metric(text, "fenwick_state_slots_used") == 0
    assert (
        metric(text, "fenwick_num_requests_running") == 0
        and metric(text, "fenwick_num_requests_waiting") == 0
    )
    assert metric(text, "fenwick_request_success_total", 'finish_reason="abort"') - aborted_before == len(
        gone
    )
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "after the storm", "max_tokens": 4})
    assert r.status_code == 200


def test_metrics_move(server: ServerProcess) -> None:
    names = [
        "fenwick_prompt_tokens_total",
        "fenwick_generation_tokens_total",
        "fenwick_time_to_first_token_seconds_count",
        "fenwick_e2e_request_latency_seconds_count",
        "fenwick_request_queue_time_seconds_count",
        "fenwick_iteration_tokens_count",
        "fenwick_inter_token_latency_seconds_count",
    ]
    before = httpx.get(f"{server.url}/metrics").text
    for name in names + ["fenwick_state_slots_total", "fenwick_state_memory_bytes"]:
        assert f"\n{name} " in before, name
    assert (
        metric(before, "fenwick_state_slots_total") >= 64 and metric(before, "fenwick_state_memory_bytes") > 0
    )
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "Count the tokens", "max_tokens": 5, "ignore_eos": True},
    ).json()
    after = wait_for_metrics(server.url, lambda t: metric(t, names[3]) > metric(before, names[3]))
    delta = {n: metric(after, n) - metric(before, n) for n in names}
    assert delta["fenwick_prompt_tokens_total"] == r["usage"]["prompt_tokens"]
    assert delta["fenwick_generation_tokens_total"] == 5
    assert delta["fenwick_time_to_first_token_seconds_count"] == 1 and delta[names[3]] == 1
    assert delta["fenwick_inter_token_latency_seconds_count"] == 4
    length = 'finish_reason="length"'
    assert (
        metric(after, "fenwick_request_success_total", length)
        == metric(before, "fenwick_request_success_total", length) + 1
    )
    ok = 'path="/v1/completions",status="200"'
    assert (
        metric(after, "fenwick_http_requests_total", ok)
        >= metric(before, "fenwick_http_requests_total", ok) + 1
    )
    httpx.post(f"{server.url}/v1/completions", json={"prompt": ""})
    bad = 'path="/v1/completions",status="400"'
    assert metric(httpx.get(f"{server.url}/metrics").text, "fenwick_http_requests_total", bad) >= 1


@pytest.fixture(scope="module")
def small_server(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """Two slots, four waiting places, an API key; SIGTERM'd by the last test."""
    flags = f"--device cpu --max-num-seqs 2 --max-waiting 4 --api-key {KEY} --max-model-len 256".split()
    args = ["--model", str(tiny_model_dir), *flags]
    with ServerProcess(args) as proc:
        yield proc


def test_api_key(small_server: ServerProcess) -> None:
    url = small_server.url
    body = {"prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert (
        httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code
        == 200
    )
    assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200


async def test_queue_full_is_429(small_server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Busy busy", "max_tokens": 48, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=small_server.url, headers=headers, timeout=120) as client:

        async def one() -> httpx.Response:
            r = await client.post("/v1/completions", json=body)
            return r

        responses = await asyncio.gather(*(one() for _ in range(16)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert parse_sse(r.text)[-1] == "[DONE]"
        assert (await client.post("/v1/completions", json={**body, "stream": False})).status_code == 200


def test_sigterm_drains_streams(small_server: ServerProcess) -> None:
    """SIGTERM with 2 streams running and 2 queued: all 4 finish in full, then the process exits 0."""
    headers = {"Authorization": f"Bearer {KEY}"}
    results: dict[int, list[Any]] = {}

    def stream(i: int) -> None:
        body = {
            "prompt": f"Stream {i}",
            "max_tokens": 100,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream(
            "POST", f"{small_server.url}/v1/completions", json=body, headers=headers, timeout=120
        ) as r:
            raw = r.read().decode()
            assert r.status_code == 200, raw
            results[i] = parse_sse(raw)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    wait_for_metrics(
        small_server.url,
        lambda t: (
            metric(t, "fenwick_num_requests_running") == 2 and metric(t, "fenwick_num_requests_waiting") == 2
        ),
        timeout=30,
    )
    small_server.terminate()
    for t in threads:
        t.join(timeout=120)
    # uvicorn re-raises the SIGTERM it caught once the graceful shutdown is done
    assert small_server.proc.wait(timeout=60) in (0, -signal.SIGTERM), small_server.output()
    assert sorted(results) == [0, 1, 2, 3]
    for events in results.values():
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 100
        assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert "Finished server process" in small_server.output()
