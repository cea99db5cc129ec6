"""fenwick_client's sync API surface against the stub server of test_client_stub.py: what each endpoint
sends and parses, typed stream chunks, broken streams that raise, early-closed streams that hang up."""

from __future__ import annotations

from collections.abc import Iterator

import fenwick_client as fc
import httpx
import pytest
from fenwick_client._policy import SSEParser, parse_retry_after
from test_client_stub import Reply, StubServer, chunk, make_client, running_stub


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with running_stub() as server:
        yield server


def test_completion_sends_the_extras_and_parses_the_answer(stub: StubServer) -> None:
    with make_client(stub, api_key="sk-test") as client:
        out = client.completions.create(
            prompt="hi",
            model="tiny",
            max_tokens=4,
            top_k=5,
            min_p=0.1,
            repetition_penalty=1.2,
            seed=7,
            min_tokens=1,
            ignore_eos=True,
            stop_token_ids=(3, 4),
            extra_body={"foo": 1},
        )
    assert isinstance(out, fc.Completion)
    assert out.choices[0].text == "hello" and out.usage is not None and out.usage.total_tokens == 3
    (seen,) = stub.seen
    assert (seen.method, seen.path) == ("POST", "/v1/completions")
    assert seen.headers["Authorization"] == "Bearer sk-test"
    assert seen.body == {
        "model": "tiny",
        "prompt": "hi",
        "max_tokens": 4,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.2,
        "seed": 7,
        "min_tokens": 1,
        "ignore_eos": True,
        "stop_token_ids": [3, 4],
        "stream": False,
        "foo": 1,
    }


def test_other_endpoints(stub: StubServer) -> None:
    stub.expect(
        Reply(json={"object": "list", "data": [{"id": "tiny", "max_model_len": 64}]}),
        Reply(json={"tokens": [1, 2], "count": 2, "max_model_len": 64}),
        Reply(json={"prompt": "ab"}),
        Reply(json={"status": "ok"}),
        Reply(503, {"error": {"message": "draining"}}),
    )
    with fc.Client(stub.url + "/v1/") as client:  # an OpenAI-style base URL is accepted too
        assert client.models.list().data[0].id == "tiny"
        assert client.tokenize("ab").tokens == [1, 2]
        assert client.detokenize([1, 2]).prompt == "ab"
        assert client.health() is True
        assert client.health() is False
    assert [s.path for s in stub.seen] == ["/v1/models", "/tokenize", "/detokenize", "/health", "/health"]
    assert stub.seen[1].body == {"prompt": "ab"} and stub.seen[2].body == {"tokens": [1, 2]}


def test_stream_yields_typed_chunks_then_usage(stub: StubServer) -> None:
    usage = {
        "id": "c",
        "choices": [],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    stub.expect(Reply(events=[chunk("a"), chunk("b", "stop"), usage]))
    with (
        make_client(stub) as client,
        client.completions.create(prompt="hi", stream=True, include_usage=True) as stream,
    ):
        chunks = list(stream)
    assert (
        "".join(c.choices[0].text for c in chunks[:2]) == "ab"
        and chunks[1].choices[0].finish_reason == "stop"
    )
    assert chunks[2].usage is not None and chunks[2].usage.completion_tokens == 2
    assert stub.seen[0].body["stream"] is True and stub.seen[0].body["stream_options"] == {
        "include_usage": True
    }


def test_chat_stream_and_status_retry_before_it_starts(stub: StubServer) -> None:
    delta = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "yo"}}],
    }
    stub.expect(Reply(429, headers={"retry-after-ms": "10"}), Reply(events=[delta, delta]))
    with make_client(stub) as client:
        stream = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], stream=True)
        assert [c.choices[0].delta.content for c in stream] == ["yo", "yo"]
    assert len(stub.seen) == 2 and stub.seen[1].path == "/v1/chat/completions"


@pytest.mark.parametrize(
    ("reply", "exc"),
    [
        (Reply(events=[chunk("a")], done=False, chunked=False), fc.IncompleteStreamError),
        (Reply(events=[chunk("a")], done=False, chunked=True), fc.IncompleteStreamError),
        (Reply(events=[chunk("a")], drop=True), fc.APIConnectionError),
        (
            Reply(events=[chunk("a"), {"error": {"message": "engine died", "type": "internal_error"}}]),
            fc.APIStreamError,
        ),
        (Reply(events=[chunk("a"), chunk("b")], stall=10), fc.APITimeoutError),
    ],
    ids=["eof-without-done", "chunked-end-without-done", "dropped-mid-body", "error-event", "stalled"],
)
def test_broken_stream_raises_after_the_chunks_it_got(
    stub: StubServer, reply: Reply, exc: type[Exception]
) -> None:
    stub.expect(reply)
    got: list[str] = []
    with make_client(stub, timeout=fc.Timeout(connect=2, read=0.3)) as client, pytest.raises(exc):
        for c in client.completions.create(prompt="hi", stream=True):
            got.append(c.choices[0].text)
    assert got == ["a"] and len(stub.seen) == 1


@pytest.mark.parametrize("how", ["with", "close", "dropped"])
def test_leaving_a_stream_early_closes_the_connection(stub: StubServer, how: str) -> None:
    stub.expect(Reply(events=[chunk(str(i)) for i in range(200)], event_delay=0.02))
    with make_client(stub) as client:
        stream = client.completions.create(prompt="hi", stream=True)
        if how == "with":
            with stream:
                next(iter(stream))
        elif how == "close":
            next(stream)
            stream.close()
        else:
            for _ in stream:
                break
            del stream
        assert stub.disconnected.wait(3.0), "the server never saw the client go"


def test_sse_parser_handles_multiline_data_comments_and_a_missing_last_blank_line() -> None:
    parser = SSEParser(fc.Completion, None)
    lines = [
        ": keep-alive",
        "event: message",
        'data: {"id": "a",',
        'data: "choices": []}',
        "",
        "data: [DONE]",
    ]
    got = [c for c in map(parser.feed, lines) if c is not None]
    assert [c.id for c in got] == ["a"] and not parser.done
    parser.finish()
    assert parser.done
    with pytest.raises(fc.IncompleteStreamError):
        SSEParser(fc.Completion, None).finish()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),  # in the past
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "3600"}, None),  # unreasonable: fall back to backoff
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(httpx.Headers(headers)) == expected


def test_timeout_maps_to_httpx() -> None:
    t = fc.Client(timeout=fc.Timeout(connect=5, read=600)).options.timeout
    assert (t.connect, t.read) == (5, 600)
    assert fc.Client(timeout=httpx.Timeout(3.0)).options.timeout.read == 3.0
