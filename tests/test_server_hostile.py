"""Issue 19 at the HTTP edge, in-process over the fake engine: strict and bounded parameters, 400 not 429
or 500 for what a retry cannot fix, chat templates, /openapi.json, engine health, SIGTERM's deadline,
bounded per-stream output and the API key."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine
from fenwick_llm.server import cli
from fenwick_llm.server.app import create_app
from fenwick_llm.server.config import ServerConfig
from server_utils import assert_error, metric, parse_sse

LIMITS = ServerConfig(max_body_bytes=1 << 20, max_n=4, max_stop=3, max_stop_chars=8, max_prompts=5,
                      max_logprobs=5, default_max_tokens=7, chat_template_timeout=1.0, max_prompt_chars=5000)


@pytest.fixture
async def app_client() -> AsyncIterator[tuple[FakeEngine, Any, httpx.AsyncClient]]:
    engine = FakeEngine(max_num_seqs=4, max_waiting=8)
    engine.config.max_waiting = 8  # the fake's queue: 8 waiting + 4 running engine requests at once
    app = create_app(engine, LIMITS)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield engine, app, client


def raw(client: httpx.AsyncClient, body: str, path: str = "/v1/completions") -> Any:
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


BAD_BODIES = [
    ("max-tokens-string", '{"prompt": "A", "max_tokens": "5"}', "max_tokens"),
    ("max-tokens-bool", '{"prompt": "A", "max_tokens": true}', "max_tokens"),
    ("max-tokens-float", '{"prompt": "A", "max_tokens": 5.0}', "max_tokens"),
    ("stream-int", '{"prompt": "A", "stream": 1}', "stream"),
    ("temperature-nan", '{"prompt": "A", "temperature": NaN}', "temperature"),
    ("temperature-inf", '{"prompt": "A", "temperature": Infinity}', "temperature"),
    ("seed-over-64-bits", '{"prompt": "A", "seed": 18446744073709551616, "temperature": 1}', "seed"),
    ("top-k-over-int64", '{"prompt": "A", "top_k": 9223372036854775808, "top_p": 0.95}', "top_k"),
    ("lone-surrogate", '{"prompt": "A \\ud800 B"}', "prompt"),
    ("surrogate-stop", '{"prompt": "A", "stop": ["\\udfff"]}', "stop"),
    ("too-many-stops", '{"prompt": "A", "stop": ["a", "b", "c", "d"]}', "stop"),
    ("long-stop", '{"prompt": "A", "stop": "123456789"}', "stop"),
    ("too-many-stop-ids", '{"prompt": "A", "stop_token_ids": [3, 4, 5, 6]}', "stop_token_ids"),
    ("n-over-bound", '{"prompt": "A", "n": 5}', "n"),
    ("logprobs-over-bound", '{"prompt": "A", "logprobs": 6}', "logprobs"),
    ("too-many-prompts", json.dumps({"prompt": ["a"] * 6}), "prompt"),
]


@pytest.mark.parametrize("body,param", [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
async def test_bad_values_are_400(app_client: Any, body: str, param: str) -> None:
    _, _, client = app_client
    assert_error(await raw(client, body), 400, param)
    assert (await client.get("/health")).status_code == 200


async def test_more_prompts_than_the_queue_holds_is_400_not_429(app_client: Any) -> None:
    engine, app, client = app_client
    engine.config.max_waiting = 1  # 1 waiting + 4 running: five prompts fit, six never can
    app2 = create_app(engine, ServerConfig(max_prompts=64))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app2), base_url="http://t") as c2:
        r = await c2.post("/v1/completions", json={"prompt": ["a"] * 6, "max_tokens": 1})
        assert_error(r, 400, "prompt")
        assert "retry-after" not in r.headers


async def test_chat_templates(app_client: Any) -> None:
    _, _, client = app_client
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = await client.post("/v1/chat/completions", json={**chat, "chat_template": "{{ messages }}"})
    assert_error(r, 400, "chat_template")
    r = await client.post("/v1/chat/completions", json={**chat, "chat_template_kwargs": {"messages": []}})
    assert_error(r, 400, "chat_template_kwargs")
    assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200


async def test_default_max_tokens_and_model_card(app_client: Any) -> None:
    _, _, client = app_client
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    r = (await client.post("/v1/chat/completions", json=chat)).json()
    assert r["usage"]["completion_tokens"] == LIMITS.default_max_tokens
    card = (await client.get("/v1/models")).json()["data"][0]
    assert card["root"] == "fake" and "/" not in card["root"]


async def test_openapi_matches_behaviour(app_client: Any) -> None:
    _, _, client = app_client
    doc = (await client.get("/openapi.json")).json()
    text = json.dumps(doc)
    assert '"422"' not in text and "HTTPValidationError" not in text
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "404", "413", "429", "503"} <= set(responses)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "text/plain" in next(iter(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]))
    request = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["n"]["maximum"] == LIMITS.max_n
    seed = [b for b in request["seed"]["anyOf"] if b.get("type") == "integer"][0]
    assert seed["maximum"] == 2**64 - 1


async def test_engine_up_metric_follows_the_engine(app_client: Any) -> None:
    engine, _, client = app_client
    assert metric((await client.get("/metrics")).text, "fenwick_engine_up") == 1.0
    engine.stopped = True
    assert metric((await client.get("/metrics")).text, "fenwick_engine_up") == 0.0
    assert_error(await client.get("/health"), 503)


async def test_shutdown_ends_running_streams_with_an_error_event() -> None:
    engine = FakeEngine(step_s=0.01)
    app = create_app(engine, ServerConfig(shutdown_timeout=0.5))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as client,
    ):
        body = {"prompt": "abc", "max_tokens": 250, "stream": True}  # 2.5 s of tokens
        task = asyncio.create_task(client.post("/v1/completions", json=body))
        await asyncio.sleep(0.1)
        app.state.shutdown.begin()
        assert_error(await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}), 503)
        started = time.monotonic()
        events = parse_sse((await task).text)
        assert time.monotonic() - started < 1.0
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutdown"
        assert engine.slots_used == 0


async def test_a_stream_nobody_reads_holds_one_snapshot() -> None:
    """The engine runs far ahead of a reader that never reads: the stream keeps only the newest
    cumulative snapshot per prompt, and the reader still gets every token."""
    from fenwick_llm.engine.sampling_params import SamplingParams
    from fenwick_llm.server.request_stream import RequestStream

    engine = FakeEngine(step_s=0.0)
    stream = RequestStream(engine, ["ab", "cd"], SamplingParams(max_tokens=250), "r")
    while any(not t.done() for t in stream._tasks):
        await asyncio.sleep(0.01)
        assert len(stream._holder) <= 2
    outs = await stream.final_outputs()
    assert [len(o.outputs[0].token_ids) for o in outs] == [250, 250]


def serve_args(*flags: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["serve", *flags])


def test_api_key_fails_closed() -> None:
    assert cli.resolve_api_key(serve_args(), {}) is None  # none given at all: open
    assert cli.resolve_api_key(serve_args("--no-api-key"), {}) is None
    assert cli.resolve_api_key(serve_args("--api-key", "k1\n"), {}) == "k1"
    assert cli.resolve_api_key(serve_args(), {"FENWICK_API_KEY": " k2\n"}) == "k2"
    assert cli.resolve_api_key(serve_args("--api-key", "k3"), {"FENWICK_API_KEY": "k2"}) == "k3"
    for args, env in ((serve_args("--api-key", ""), {}), (serve_args("--api-key", " \n"), {}),
                      (serve_args(), {"FENWICK_API_KEY": ""}),
                      (serve_args("--no-api-key"), {"FENWICK_API_KEY": "k"})):
        with pytest.raises(ValueError):
            cli.resolve_api_key(args, env)
    with pytest.raises(SystemExit):
        serve_args("--api-key", "k", "--no-api-key")
    with pytest.raises(ValueError):
        ServerConfig(api_key=" ")


async def test_a_configured_key_with_a_newline_matches() -> None:
    app = create_app(FakeEngine(), ServerConfig(api_key="sekret\n"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        ok = await client.get("/v1/models", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert_error(await client.get("/v1/models", headers={"Authorization": "Bearer sekre"}), 401)
        assert_error(await client.get("/v1/models", headers={"Authorization": "Bearer sekret2"}), 401)


def test_slow_headers_are_cut_and_the_engine_death_exits_non_zero() -> None:
    import socket
    import threading

    import uvicorn
    from fenwick_llm.server.http_server import FenwickServer, header_limited_h11
    from server_utils import free_port

    engine = FakeEngine()
    app = create_app(engine)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            http=header_limited_h11(0.3, 2048), h11_max_incomplete_event_size=2048)
    server = FenwickServer(config, app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        started = time.monotonic()
        assert slow.recv(100) == b"" and time.monotonic() - started < 2.0  # closed by the deadline
    with socket.create_connection(("127.0.0.1", port), timeout=5) as big:
        big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
        assert big.recv(100).startswith(b"HTTP/1.1 400")
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    server.engine_death(RuntimeError("boom"))  # what AsyncLLM's death listener calls
    thread.join(timeout=10)
    assert not thread.is_alive() and server.engine_died
