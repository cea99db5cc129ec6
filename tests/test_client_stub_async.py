"""fenwick_client.AsyncClient against the scripted stub server of test_client_stub.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import fenwick_client as fc
import pytest
from test_client_stub import COMPLETION, Reply, StubServer, chunk, error, running_stub


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with running_stub() as server:
        yield server


def make_client(stub: StubServer, **kwargs: Any) -> fc.AsyncClient:
    options: dict[str, Any] = {
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "timeout": fc.Timeout(connect=2, read=5),
    }
    return fc.AsyncClient(stub.url, **{**options, **kwargs})


async def test_completion_and_chat(stub: StubServer) -> None:
    message = {"role": "assistant", "content": "hey"}
    stub.expect(
        Reply(json=COMPLETION), Reply(json={"id": "x", "choices": [{"index": 0, "message": message}]})
    )
    async with make_client(stub) as client:
        out = await client.completions.create(prompt=[1, 2, 3], top_k=3, seed=1)
        chat = await client.chat.completions.create(
            messages=[fc.ChatMessage(role="user", content="hi")], min_p=0.2
        )
    assert isinstance(out, fc.Completion) and out.choices[0].text == "hello"
    assert isinstance(chat, fc.ChatCompletion) and chat.choices[0].message.content == "hey"
    assert stub.seen[0].body["prompt"] == [1, 2, 3] and stub.seen[0].body["top_k"] == 3
    assert (
        stub.seen[1].body["messages"] == [{"role": "user", "content": "hi"}]
        and stub.seen[1].body["min_p"] == 0.2
    )


async def test_retries_honouring_retry_after_then_succeeds(stub: StubServer) -> None:
    stub.expect(Reply(429, headers={"Retry-After": "1"}), error(503), Reply(json=COMPLETION))
    async with make_client(stub, max_retries=2) as client:
        await client.completions.create(prompt="hi")
    assert len(stub.seen) == 3
    assert 0.9 <= stub.seen[1].at - stub.seen[0].at < 3.0


@pytest.mark.parametrize("status", [400, 401, 404])
async def test_no_retry_on_client_errors(stub: StubServer, status: int) -> None:
    stub.expect(error(status))
    async with make_client(stub, max_retries=3) as client:
        with pytest.raises(fc.APIStatusError) as info:
            await client.completions.create(prompt="hi")
    assert len(stub.seen) == 1 and info.value.status_code == status and info.value.request_id == "req-42"


async def test_gives_up_after_max_retries(stub: StubServer) -> None:
    stub.expect(*[error(500)] * 3)
    async with make_client(stub, max_retries=2) as client:
        with pytest.raises(fc.InternalServerError):
            await client.completions.create(prompt="hi")
    assert len(stub.seen) == 3


async def test_read_timeout(stub: StubServer) -> None:
    stub.expect(Reply(hang=10))
    async with make_client(stub, max_retries=0, timeout=fc.Timeout(connect=2, read=0.2)) as client:
        start = time.monotonic()
        with pytest.raises(fc.APITimeoutError):
            await client.completions.create(prompt="hi")
    assert time.monotonic() - start < 2.0


async def test_stream_with_usage(stub: StubServer) -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    stub.expect(Reply(events=[chunk("a"), chunk("b"), usage]))
    async with make_client(stub) as client:
        stream = await client.completions.create(prompt="hi", stream=True, include_usage=True)
        assert isinstance(stream, fc.AsyncStream)
        chunks = [c async for c in stream]
    assert [c.choices[0].text for c in chunks[:2]] == ["a", "b"] and chunks[2].usage is not None


@pytest.mark.parametrize(
    ("reply", "exc"),
    [
        (Reply(events=[chunk("a")], done=False, chunked=False), fc.IncompleteStreamError),
        (Reply(events=[chunk("a")], drop=True), fc.APIConnectionError),
        (Reply(events=[chunk("a"), chunk("b")], stall=10), fc.APITimeoutError),
    ],
    ids=["eof-without-done", "dropped-mid-body", "stalled"],
)
async def test_broken_stream_raises(stub: StubServer, reply: Reply, exc: type[Exception]) -> None:
    stub.expect(reply)
    got: list[str] = []
    async with make_client(stub, timeout=fc.Timeout(connect=2, read=0.3)) as client:
        stream = await client.completions.create(prompt="hi", stream=True)
        assert isinstance(stream, fc.AsyncStream)
        with pytest.raises(exc):
            async for c in stream:
                got.append(c.choices[0].text)
    assert got == ["a"]


@pytest.mark.parametrize("how", ["async-with", "close"])
async def test_leaving_a_stream_early_closes_the_connection(stub: StubServer, how: str) -> None:
    stub.expect(Reply(events=[chunk(str(i)) for i in range(200)], event_delay=0.02))
    async with make_client(stub) as client:
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": "x"}], stream=True
        )
        assert isinstance(stream, fc.AsyncStream)
        if how == "async-with":
            async with stream:
                async for _ in stream:
                    break
        else:
            await stream.__anext__()
            await stream.close()
        assert await asyncio.to_thread(stub.disconnected.wait, 3.0), "the server never saw the client go"
