"""fenwick_client against a real `fenwick serve` process on a tiny random model (the session's shared
`server` fixture from tests/server_utils.py): sync, async, streaming, chat, the extras and typed errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import fenwick_client as fc
import httpx
import pytest
from server_utils import ServerProcess, metric

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[fc.Client]:
    with fc.Client(server.url, max_retries=0, timeout=fc.Timeout(connect=5, read=60)) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: fc.Client) -> str:
    return client.models.list().data[0].id


def test_models_health_version(client: fc.Client, model: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model] and models.data[0].max_model_len == 256
    assert client.health() is True
    assert client.version().version


def test_tokenize_round_trip(client: fc.Client, model: str) -> None:
    tok = client.tokenize("Hello, world!", model=model, add_special_tokens=False)
    assert tok.count == len(tok.tokens) > 0 and tok.max_model_len == 256
    assert client.detokenize(tok.tokens).prompt == "Hello, world!"
    chat = client.tokenize(messages=MESSAGES)
    assert chat.count > tok.count


def test_completion_stream_matches_non_stream(client: fc.Client, model: str) -> None:
    kw = {
        "model": model,
        "prompt": "The quick brown fox",
        "max_tokens": 10,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    full = client.completions.create(**kw)
    assert isinstance(full, fc.Completion)
    assert full.choices[0].finish_reason == "length" and full.usage is not None
    assert full.usage.completion_tokens == 10
    with client.completions.create(**kw, stream=True, include_usage=True) as stream:
        assert isinstance(stream, fc.Stream) and stream.request_id
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_chat_stream_matches_non_stream(client: fc.Client, model: str) -> None:
    kw = {"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0.0}
    full = client.chat.completions.create(**kw)
    assert isinstance(full, fc.ChatCompletion) and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert isinstance(chunks[0], fc.ChatCompletionChunk) and chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == full.choices[0].message.content
    )


def test_sampling_extras(client: fc.Client, model: str) -> None:
    kw = {"model": model, "prompt": "Once upon a time", "max_tokens": 6, "ignore_eos": True}
    greedy = client.completions.create(**kw, temperature=0.0)
    top1 = client.completions.create(**kw, temperature=1.0, top_k=1)
    assert isinstance(greedy, fc.Completion) and isinstance(top1, fc.Completion)
    assert top1.choices[0].text == greedy.choices[0].text
    seeded = [client.completions.create(**kw, temperature=1.0, seed=5, min_p=0.01) for _ in range(2)]
    assert seeded[0].choices[0].text == seeded[1].choices[0].text  # type: ignore[union-attr]
    r = client.completions.create(
        **kw, repetition_penalty=1.3, min_tokens=3, stop_token_ids=[0], top_p=0.9, n=2, seed=1
    )
    assert isinstance(r, fc.Completion) and sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage is not None and r.usage.completion_tokens == 12


@pytest.mark.parametrize(
    ("kwargs", "cls", "param"),
    [
        ({"model": "nope", "prompt": "x"}, fc.NotFoundError, None),
        ({"prompt": "x", "temperature": -1.0}, fc.BadRequestError, "temperature"),
        ({"prompt": [5] * 300, "max_tokens": 4}, fc.BadRequestError, None),
        ({"prompt": "x" * (1 << 20)}, fc.RequestTooLargeError, None),
    ],
    ids=["unknown-model", "bad-param", "too-long", "body-too-large"],
)
def test_errors_are_typed_and_not_retried(
    server: ServerProcess, kwargs: dict[str, object], cls: type[fc.APIStatusError], param: str | None
) -> None:
    with fc.Client(server.url, max_retries=3, backoff_base=1.0) as client:
        start = time.monotonic()
        with pytest.raises(cls) as info:
            client.completions.create(**kwargs)  # type: ignore[arg-type]
    err = info.value
    assert err.status_code == cls.status_code and err.message and err.type and err.request_id
    assert param is None or err.param == param
    assert time.monotonic() - start < 1.0  # a retry would have slept for backoff_base


def test_leaving_a_stream_early_aborts_the_request(
    server: ServerProcess, client: fc.Client, model: str
) -> None:
    def metrics() -> tuple[float, float, float]:
        text = httpx.get(f"{server.url}/metrics").text
        return (
            metric(text, "fenwick_num_requests_running"),
            metric(text, "fenwick_request_success_total", 'finish_reason="abort"'),
            metric(text, "fenwick_generation_tokens_total"),
        )

    _, aborted, generated = metrics()
    stream = client.completions.create(
        model=model, prompt="Hello", max_tokens=200, ignore_eos=True, stream=True
    )
    with stream:
        next(iter(stream))
    deadline = time.monotonic() + 10
    while (now := metrics())[0] > 0 or now[1] == aborted:
        assert time.monotonic() < deadline, "the server kept generating for a closed stream"
        time.sleep(0.1)
    assert now[1] == aborted + 1 and now[2] - generated < 200


async def test_async_client(server: ServerProcess) -> None:
    async with fc.AsyncClient(server.url, max_retries=0) as client:
        model = (await client.models.list()).data[0].id
        kw = {"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0.0}

        async def streamed() -> str:
            stream = await client.chat.completions.create(**kw, stream=True)
            assert isinstance(stream, fc.AsyncStream)
            async with stream:
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        full = await client.chat.completions.create(**kw)
        assert isinstance(full, fc.ChatCompletion)
        texts = await asyncio.gather(*(streamed() for _ in range(4)))
        assert texts == [full.choices[0].message.content] * 4
        comp = await client.completions.create(model=model, prompt="Hello", max_tokens=3, top_k=5)
        assert (
            isinstance(comp, fc.Completion) and comp.usage is not None and comp.usage.completion_tokens <= 3
        )
        assert (await client.tokenize("Hello")).count > 0 and await client.health()
        with pytest.raises(fc.NotFoundError):
            await client.completions.create(model="nope", prompt="x")


KEY = "sk-client-test"


@pytest.fixture(scope="module")
def small_server(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """Two slots, two waiting places and an API key: a queue that overflows with 429s."""
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--max-model-len", "256"]
    proc = ServerProcess([*args, "--max-num-seqs", "2", "--max-waiting", "2", "--api-key", KEY])
    try:
        yield proc
    finally:
        proc.stop()


def test_api_key(small_server: ServerProcess) -> None:
    with fc.Client(small_server.url, max_retries=3, backoff_base=1.0) as client:
        with pytest.raises(fc.AuthenticationError) as info:
            client.models.list()
        assert info.value.code == "invalid_api_key"
    with fc.Client(small_server.url, api_key=KEY) as client:
        assert client.models.list().data and client.health()


async def test_queue_full_429s_are_retried_until_all_succeed(small_server: ServerProcess) -> None:
    throttled = 'path="/v1/completions",status="429"'
    before = metric(httpx.get(f"{small_server.url}/metrics").text, "fenwick_http_requests_total", throttled)
    async with fc.AsyncClient(small_server.url, api_key=KEY, max_retries=10, backoff_base=0.05) as client:

        async def one(i: int) -> str:
            stream = await client.completions.create(
                prompt=f"Busy {i}", max_tokens=24, ignore_eos=True, stream=True
            )
            assert isinstance(stream, fc.AsyncStream)
            async with stream:
                return "".join([c.choices[0].text async for c in stream if c.choices])

        texts = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), timeout=120)
    assert len(texts) == 8 and all(texts)
    after = metric(httpx.get(f"{small_server.url}/metrics").text, "fenwick_http_requests_total", throttled)
    assert after > before, "the queue never overflowed, so nothing was retried"
