"""The HTTP edge in-process, over a fake engine: routes, request ids, limits, metrics, auth, failures,
and disconnects through a real uvicorn."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from fake_engine import FakeEngine
from fenwick_llm.server.app import create_app
from fenwick_llm.server.config import ServerConfig
from server_utils import assert_error, free_port, parse_sse


async def test_routes_and_request_id(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/version")).json()["version"]
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake"
    assert (await client.get("/v1/models/fake")).json()["max_model_len"] == 256
    assert_error(await client.get("/v1/models/other"), 404, "model")
    assert_error(await client.get("/no/such/path"), 404)
    assert_error(await client.get("/v1/completions"), 405)
    tok = (await client.post("/tokenize", json={"prompt": "abc"})).json()
    assert tok["count"] == 4 and tok["tokens"][0] == 1
    assert (await client.post("/detokenize", json={"tokens": tok["tokens"][1:]})).json()["prompt"] == "abc"
    chat_tok = (await client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})).json()
    assert chat_tok["count"] == len("user: hi\nassistant:")
    assert_error(await client.post("/tokenize", json={}), 400)
    assert_error(await client.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
    r = await client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len((await client.get("/health")).headers["x-request-id"]) == 32


async def test_body_too_large(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/v1/completions", json={"prompt": "x" * 5000}), 413)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    assert_error(await client.post("/v1/completions", content=chunked()), 413)
    assert (await client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1})).status_code == 200


async def test_metrics(client: httpx.AsyncClient) -> None:
    await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})
    await client.post("/v1/completions", json={"prompt": ""})
    text = (await client.get("/metrics")).text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "state_slots_used",
        "state_slots_total",
        "state_memory_bytes",
        "prompt_tokens_total",
        "generation_tokens_total",
        "request_success_total",
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "iteration_tokens",
    ):
        assert f"# TYPE fenwick_{name.removesuffix('_total')}" in text, name
    assert "fenwick_generation_tokens_total 3.0" in text
    assert 'fenwick_http_requests_total{path="/v1/completions",status="400"} 1.0' in text


async def test_engine_death_mid_stream(engine_client: tuple[FakeEngine, httpx.AsyncClient]) -> None:
    engine, client = engine_client
    engine.die_after = 3
    r = await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10, "stream": True})
    events = parse_sse(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_dead" and len(events) == 2 + 3
    assert_error(await client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10}), 503)


async def test_bug_is_a_counted_500(engine_client: tuple[FakeEngine, httpx.AsyncClient]) -> None:
    engine, client = engine_client

    def broken(text: str, add_special_tokens: bool = True) -> list[int]:
        raise RuntimeError("tokenizer bug")

    engine.tokenizer.encode = broken  # type: ignore[method-assign]
    r = await client.post("/tokenize", json={"prompt": "x"}, headers={"X-Request-Id": "bug-1"})
    assert_error(r, 500)
    assert r.headers["x-request-id"] == "bug-1"
    assert (
        'fenwick_http_requests_total{path="/tokenize",status="500"} 1.0'
        in (await client.get("/metrics")).text
    )


async def test_health_503_when_engine_stopped() -> None:
    engine = FakeEngine()
    app = create_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert_error(await client.get("/health"), 503)  # lifespan never started the engine


async def test_queue_full_is_429() -> None:
    engine = FakeEngine(max_waiting=0)
    app = create_app(engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
        assert_error(r, 429)
        assert r.headers["retry-after"] == "2"


async def test_api_key() -> None:
    app = create_app(FakeEngine(), ServerConfig(api_key="sekret"))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        assert_error(await client.post("/v1/completions", json={"prompt": "x"}), 401)
        assert_error(await client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer sekret"})).status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


@pytest.fixture
def live_fake() -> Iterator[tuple[FakeEngine, str]]:
    """A real uvicorn (so disconnects are real) in a thread, over a slow fake engine."""
    engine = FakeEngine(max_num_seqs=8, step_s=0.01)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield engine, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_disconnect_aborts(live_fake: tuple[FakeEngine, str], stream: bool) -> None:
    engine, url = live_fake
    body = {"prompt": "abc", "max_tokens": 200, "stream": stream}
    with httpx.Client(base_url=url, timeout=5) as client:
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as r:
                next(r.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json=body, timeout=0.3)
        deadline = time.monotonic() + 5
        while (engine.slots_used or not engine.aborted) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.slots_used == 0 and len(engine.aborted) == 1
        assert client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2}).status_code == 200
