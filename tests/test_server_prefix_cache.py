"""The prefix cache over HTTP (a real `fenwick serve` on the tiny model): a chat's second turn reports the
tokens it restored in usage.prompt_tokens_details.cached_tokens (also in the streamed usage chunk, and on
completions), and /metrics counts lookups and hits in tokens and the bytes held."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI
from server_utils import ServerProcess, metric, parse_sse


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def counters(http: httpx.Client) -> tuple[float, float, float]:
    text = http.get("/metrics").text
    return (metric(text, "fenwick_prefix_cache_queries_total"),
            metric(text, "fenwick_prefix_cache_hits_total"),
            metric(text, "fenwick_prefix_cache_bytes", 'tier="device"'))


def test_chat_turns_report_cached_tokens_and_metrics_count_them(http: httpx.Client) -> None:
    queries0, hits0, _ = counters(http)
    messages = [{"role": "user", "content": f"A story about the fox {uuid.uuid4().hex}, please."}]
    body = {"messages": messages, "max_tokens": 5, "temperature": 0.0}
    first = http.post("/v1/chat/completions", json=body).json()
    usage = first["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    messages += [first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
    stream = {**body, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    events = parse_sse(http.post("/v1/chat/completions", json=stream).text)
    second = events[-2]["usage"]
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert usage["prompt_tokens"] <= cached < second["prompt_tokens"]
    queries, hits, device_bytes = counters(http)
    assert queries - queries0 == usage["prompt_tokens"] + second["prompt_tokens"]
    assert hits - hits0 == cached
    assert device_bytes > 0

    ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    comp = http.post("/v1/completions", json={"prompt": ids + [5, 6], "max_tokens": 2}).json()
    assert comp["usage"]["prompt_tokens_details"]["cached_tokens"] >= cached


def test_openai_client_reads_cached_tokens(server: ServerProcess) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    prompt = [7, 8, 9] * 12
    client.completions.create(model="tiny-shakespeare", prompt=prompt, max_tokens=2, temperature=0.0)
    again = client.completions.create(model="tiny-shakespeare", prompt=prompt + [3], max_tokens=2)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == len(prompt)
