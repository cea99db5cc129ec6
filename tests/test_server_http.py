"""Raw HTTP against a real `fenwick serve`: SSE framing, every error path, and serving on afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_utils import ServerProcess, assert_error, parse_sse

MODEL = "tiny-shakespeare"
CHAT = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_sse_framing(http: httpx.Client, path: str) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 6,
        "stream": True,
        "n": 2,
        "stream_options": {"include_usage": True},
        "extra": "ignored",
    }
    body.update({"prompt": "Hello"} if "chat" not in path else {"messages": CHAT})
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    assert all(line.startswith("data: ") for line in raw.split("\n\n") if line)
    events = parse_sse(raw)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    *chunks, usage = events[:-1]
    kind = "chat.completion.chunk" if "chat" in path else "text_completion"
    assert {c["object"] for c in events[:-1]} == {kind} and len({c["id"] for c in events[:-1]}) == 1
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 12
    finished = [ch for c in chunks for ch in c["choices"] if ch["finish_reason"] is not None]
    assert sorted(ch["index"] for ch in finished) == [0, 1]
    assert all(ch["finish_reason"] in ("stop", "length") for ch in finished)


BAD_REQUESTS: list[tuple[str, str, Any, int, str | None]] = [
    ("malformed-json", "/v1/completions", "{not json", 400, None),
    ("json-array", "/v1/completions", "[]", 400, None),
    ("missing-prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("empty-prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("prompt-object", "/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    ("negative-temperature", "/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("temperature-string", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("top-p-zero", "/v1/completions", {"prompt": "x", "top_p": 0.0}, 400, "top_p"),
    ("top-p-over-one", "/v1/completions", {"prompt": "x", "top_p": 1.01}, 400, "top_p"),
    ("max-tokens-zero", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", "/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("top-k-negative", "/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    (
        "repetition-penalty-zero",
        "/v1/completions",
        {"prompt": "x", "repetition_penalty": 0},
        400,
        "repetition_penalty",
    ),
    ("token-out-of-vocab", "/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("n-over-engine", "/v1/completions", {"prompt": "x", "n": 65}, 400, "n"),
    ("prompt-too-long", "/v1/completions", {"prompt": [5] * 300}, 400, "prompt"),
    (
        "prompt-plus-max-tokens-too-long",
        "/v1/completions",
        {"prompt": [5] * 200, "max_tokens": 100},
        400,
        "prompt",
    ),
    ("unknown-model", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("chat-no-messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    (
        "chat-unknown-role",
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages",
    ),
    (
        "chat-negative-temperature",
        "/v1/chat/completions",
        {"messages": CHAT, "temperature": -1},
        400,
        "temperature",
    ),
    ("chat-unknown-model", "/v1/chat/completions", {"messages": CHAT, "model": "nope"}, 404, "model"),
    ("detokenize-bad-id", "/detokenize", {"tokens": [99999]}, 400, "tokens"),
]


@pytest.mark.parametrize(
    "path,body,status,param", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_errors(http: httpx.Client, path: str, body: Any, status: int, param: str | None) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    for stream in (False, True):
        if stream and isinstance(body, dict):
            content = json.dumps({**body, "stream": True})
        r = http.post(path, content=content, headers={"content-type": "application/json"})
        assert_error(r, status, param)
    ok = http.post("/v1/completions", json={"prompt": "still here", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_body_too_large_and_unknown_routes(http: httpx.Client) -> None:
    assert_error(http.post("/v1/completions", json={"prompt": "x" * (2 << 20)}), 413)
    assert_error(http.get("/v2/anything"), 404)
    assert_error(http.delete("/v1/completions"), 405)
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_request_id_health_version_tokenize(http: httpx.Client) -> None:
    r = http.get("/health", headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    generated = {http.post("/v1/completions", json={"prompt": "x"}).headers["x-request-id"] for _ in range(2)}
    assert len(generated) == 2 and all(len(g) >= 16 for g in generated)
    assert http.get("/version").json()["version"]
    tokens = http.post("/tokenize", json={"prompt": "Hello, world!"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 256
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "Hello, world!"
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    text = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text == "<|user|>\nHello!<|endoftext|>\n<|assistant|>\n"  # the model's chat template


def test_non_stream_shapes(http: httpx.Client) -> None:
    comp = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "logprobs": 1}).json()
    assert set(comp) >= {"id", "object", "created", "model", "choices", "usage"}
    lp = comp["choices"][0]["logprobs"]
    assert (
        set(lp) == {"text_offset", "token_logprobs", "tokens", "top_logprobs"} and lp["text_offset"][0] == 0
    )
    body = {"messages": CHAT, "max_tokens": 3, "chat_template_kwargs": {"enable_thinking": False}}
    chat = http.post("/v1/chat/completions", json=body).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert (
        chat["usage"]["total_tokens"] == chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"]
    )
