"""The HTTP layer in-process, over a fake engine: response shapes, SSE framing, every error path."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from server_utils import assert_error, parse_sse


async def test_completion_and_stream_agree(client: httpx.AsyncClient) -> None:
    body = {"model": "fake", "prompt": "hello", "max_tokens": 6, "logprobs": 2}
    full = (await client.post("/v1/completions", json=body)).json()
    assert full["object"] == "text_completion" and full["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 6,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0},  # the fake engine caches nothing
    }
    choice = full["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["logprobs"]["tokens"]) == 6

    r = await client.post(
        "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"] == full["usage"]
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]] == choice["logprobs"]["tokens"]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == choice["logprobs"]["text_offset"] == list(range(6))
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]
    assert len({c["id"] for c in events[:-1]}) == 1


async def test_batch_prompts_and_n(client: httpx.AsyncClient) -> None:
    texts_full = (
        await client.post("/v1/completions", json={"prompt": ["ab", "cde"], "max_tokens": 2})
    ).json()
    assert texts_full["usage"]["prompt_tokens"] == 3 + 4
    body = {"prompt": [[40, 41], [5, 6, 7]], "n": 2, "max_tokens": 3}
    full = (await client.post("/v1/completions", json=body)).json()
    assert [c["index"] for c in full["choices"]] == [0, 1, 2, 3]
    assert full["usage"]["prompt_tokens"] == 2 + 3 and full["usage"]["completion_tokens"] == 12
    events = parse_sse((await client.post("/v1/completions", json={**body, "stream": True})).text)
    texts: dict[int, str] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {c["index"]: c["text"] for c in full["choices"]}


async def test_chat_stream_shape(client: httpx.AsyncClient) -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 4,
        "logprobs": True,
        "top_logprobs": 2,
    }
    full = (await client.post("/v1/chat/completions", json=body)).json()
    assert full["object"] == "chat.completion" and full["choices"][0]["message"]["role"] == "assistant"
    entry = full["choices"][0]["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
    events = parse_sse(
        (
            await client.post(
                "/v1/chat/completions",
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            )
        ).text
    )
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-2])
    assert text == full["choices"][0]["message"]["content"]
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"] == full["usage"] and events[-1] == "[DONE]"


async def test_stop_string(client: httpx.AsyncClient) -> None:
    full = (await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 6})).json()
    stop = full["choices"][0]["text"][3]
    r = (await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 6, "stop": stop})).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["stop_reason"] == stop
    assert stop not in r["choices"][0]["text"]


BAD_COMPLETIONS: list[tuple[str, Any, int, str | None]] = [
    ("malformed-json", "{bad", 400, None),
    ("not-an-object", "[1, 2]", 400, None),
    ("missing-prompt", {"max_tokens": 3}, 400, "prompt"),
    ("empty-prompt", {"prompt": ""}, 400, "prompt"),
    ("empty-prompt-list", {"prompt": []}, 400, "prompt"),
    ("prompt-wrong-type", {"prompt": 12}, 400, "prompt"),
    ("negative-temperature", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("top-p-zero", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top-p-above-one", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("max-tokens-zero", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-string", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("n-zero", {"prompt": "x", "n": 0}, 400, "n"),
    ("presence-out-of-range", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("min-tokens-over-max", {"prompt": "x", "min_tokens": 9, "max_tokens": 2}, 400, "min_tokens"),
    ("token-id-out-of-vocab", {"prompt": [1, 5000]}, 400, "prompt"),
    ("negative-token-id", {"prompt": [1, -5]}, 400, None),
    ("empty-stop", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("logprobs-too-many", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("echo", {"prompt": "x", "echo": True}, 400, "echo"),
    ("prompt-too-long", {"prompt": "x" * 300}, 400, "prompt"),
    ("unknown-model", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize(
    "body,status,param", [b[1:] for b in BAD_COMPLETIONS], ids=[b[0] for b in BAD_COMPLETIONS]
)
async def test_completion_errors(
    client: httpx.AsyncClient, body: Any, status: int, param: str | None
) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = await client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_error(r, status, param)
    ok = await client.post("/v1/completions", json={"prompt": "still serving", "max_tokens": 2})
    assert ok.status_code == 200


BAD_CHATS: list[tuple[str, Any, int, str | None]] = [
    ("no-messages", {"messages": []}, 400, "messages"),
    ("message-not-object", {"messages": ["hi"]}, 400, None),
    (
        "image-part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages",
    ),
    (
        "top-logprobs-without-logprobs",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    (
        "tools",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        400,
        "tools",
    ),
    (
        "max-completion-tokens-zero",
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
]


@pytest.mark.parametrize("body,status,param", [b[1:] for b in BAD_CHATS], ids=[b[0] for b in BAD_CHATS])
async def test_chat_errors(client: httpx.AsyncClient, body: Any, status: int, param: str | None) -> None:
    assert_error(await client.post("/v1/chat/completions", json=body), status, param)
