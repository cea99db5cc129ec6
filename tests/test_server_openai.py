"""The official `openai` package, unmodified, against a real `fenwick serve` on a tiny random model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest
from server_utils import ServerProcess

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-shakespeare"]
    assert client.models.retrieve("tiny-shakespeare").id == "tiny-shakespeare"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_greedy_stream_matches(client: openai.OpenAI) -> None:
    kw = dict(
        model="tiny-shakespeare", prompt="The quick brown fox", max_tokens=12, temperature=0, logprobs=2
    )
    full = client.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason in ("length", "stop") and full.usage is not None
    assert full.usage.completion_tokens == len(choice.logprobs.tokens) <= 12
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage == full.usage and chunks[-1].choices == []
    assert "".join(c.choices[0].text for c in chunks[:-1]) == choice.text
    assert [t for c in chunks[:-1] for t in c.choices[0].logprobs.tokens] == choice.logprobs.tokens
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert client.completions.create(**kw).choices[0].text == choice.text  # greedy is deterministic


def test_chat_greedy_stream_matches(client: openai.OpenAI) -> None:
    kw = dict(model="tiny-shakespeare", messages=MESSAGES, max_tokens=10, temperature=0)
    full = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    msg = full.choices[0].message
    assert msg.role == "assistant" and full.choices[0].finish_reason in ("length", "stop")
    entries = full.choices[0].logprobs.content
    assert len(entries) == full.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob for e in entries)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == msg.content
    assert chunks[-1].usage == full.usage


def test_n_and_seed(client: openai.OpenAI) -> None:
    kw = dict(
        model="tiny-shakespeare",
        prompt=["Hello", "Numbers: 1 2"],
        max_tokens=6,
        n=2,
        temperature=1.0,
        seed=7,
        extra_body={"top_k": 20, "ignore_eos": True},
    )
    first = client.completions.create(**kw)
    assert sorted(c.index for c in first.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in first.choices)
    assert first.usage.completion_tokens == 24
    again = client.completions.create(**kw)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]  # seeded: reproducible
    chat = client.chat.completions.create(model="tiny-shakespeare", messages=MESSAGES, max_tokens=4, n=3)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_stop_and_extras(client: openai.OpenAI) -> None:
    base = dict(model="tiny-shakespeare", prompt="Once upon a time", temperature=0)
    text = client.completions.create(**base, max_tokens=16, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[4:6]
    assert stop and stop not in text[:4]
    cut = client.completions.create(**base, max_tokens=16, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and text.startswith(cut.choices[0].text)
    assert stop not in cut.choices[0].text
    extras = {"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.2, "min_tokens": 3, "ignore_eos": True}
    r = client.completions.create(**base, max_tokens=5, extra_body=extras)
    assert r.usage.completion_tokens == 5


def test_errors_surface_as_openai_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-shakespeare", prompt="x", temperature=-1)
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="tiny-shakespeare", prompt=[5] * 300, max_tokens=4)
    assert long.value.code == "context_length_exceeded"


async def test_async_client(server: ServerProcess) -> None:
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        kw = dict(model="tiny-shakespeare", messages=MESSAGES, max_tokens=8, temperature=0)

        async def streamed() -> str:
            stream = await client.chat.completions.create(**kw, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        full = await client.chat.completions.create(**kw)
        texts = await asyncio.gather(*(streamed() for _ in range(4)))
        assert texts == [full.choices[0].message.content] * 4  # batched with others, greedy is unchanged
        comp = await client.completions.create(model="tiny-shakespeare", prompt="Hello", max_tokens=3)
        assert comp.usage.completion_tokens <= 3
