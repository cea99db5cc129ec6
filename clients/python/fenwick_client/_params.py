"""Request building, written once: each endpoint is a function of its named arguments that returns a
`RequestSpec`. The sync and async clients wrap these functions (keeping their signatures) and only differ
in how they send the spec."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from fenwick_client._policy import TimeoutLike, to_httpx_timeout
from fenwick_client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Completion,
    DetokenizeResponse,
    ModelList,
    TokenizeResponse,
    VersionResponse,
)

R = TypeVar("R", bound=BaseModel)
C = TypeVar("C", bound=BaseModel)


class NotGiven:
    """Marks an argument left out, where None has a meaning of its own (`timeout=None`: no limit)."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGiven()

Prompt = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
MessageLike = Mapping[str, Any] | ChatMessage


@dataclass(frozen=True)
class RequestSpec(Generic[R, C]):
    """One API call: where it goes, what it sends and how to read the answer."""

    method: str
    path: str
    cast_to: type[R]  # the body of a non-streaming answer
    chunk_type: type[C]  # each SSE event's payload when `stream`
    stream: bool = False
    body: dict[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: httpx.Timeout | None = None  # None: the client's default


F = TypeVar("F", bound=Callable[..., Any])


def as_method(build: Callable[..., Any], returns: str) -> Callable[[F], F]:
    """Give a client method the name, docs and signature of the request builder it wraps, plus `self`;
    `returns` formats the builder's `RequestSpec[R, C]` as the method's return (`"{0} | Stream[{1}]"`)."""

    def decorate(method: F) -> F:
        functools.wraps(build)(method)
        signature = inspect.signature(build)
        spec_types = re.fullmatch(r"RequestSpec\[(\w+), (\w+)\]", str(signature.return_annotation))
        assert spec_types is not None, signature.return_annotation
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        method.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[self_param, *signature.parameters.values()],
            return_annotation=returns.format(*spec_types.groups()),
        )
        return method

    return decorate


def _headers(stream: bool, extra_headers: Mapping[str, str] | None) -> dict[str, str]:
    return {**({"Accept": "text/event-stream"} if stream else {}), **(extra_headers or {})}


def _timeout(timeout: TimeoutLike | NotGiven) -> httpx.Timeout | None:
    return None if isinstance(timeout, NotGiven) else to_httpx_timeout(timeout)


def _sampling_body(stream: bool, include_usage: bool | None, **params: Any) -> dict[str, Any]:
    body = {key: value for key, value in params.items() if value is not None}
    body["stream"] = stream
    if stream and include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    return body


def completion_request(
    *,
    prompt: Prompt,
    model: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    n: int | None = None,
    stop: str | Sequence[str] | None = None,
    stream: bool = False,
    include_usage: bool | None = None,
    logprobs: int | None = None,
    echo: bool | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
    user: str | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    min_tokens: int | None = None,
    ignore_eos: bool | None = None,
    stop_token_ids: Sequence[int] | None = None,
    extra_body: Mapping[str, Any] | None = None,
    extra_headers: Mapping[str, str] | None = None,
    timeout: TimeoutLike | NotGiven = NOT_GIVEN,
) -> RequestSpec[Completion, Completion]:
    """POST /v1/completions. `stream=True` gives an iterator of `Completion` chunks; `include_usage` asks
    for a last chunk carrying `usage`. `top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`
    and `stop_token_ids` are Fenwick's sampling extras; `extra_body` adds raw fields."""
    body = _sampling_body(
        stream,
        include_usage,
        model=model,
        prompt=prompt if isinstance(prompt, str) else _plain(prompt),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        n=n,
        stop=stop if stop is None or isinstance(stop, str) else list(stop),
        logprobs=logprobs,
        echo=echo,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
        user=user,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
        stop_token_ids=None if stop_token_ids is None else list(stop_token_ids),
    )
    body.update(extra_body or {})
    return RequestSpec(
        "POST",
        "/v1/completions",
        Completion,
        Completion,
        stream,
        body,
        _headers(stream, extra_headers),
        _timeout(timeout),
    )


def chat_completion_request(
    *,
    messages: Sequence[MessageLike],
    model: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    n: int | None = None,
    stop: str | Sequence[str] | None = None,
    stream: bool = False,
    include_usage: bool | None = None,
    logprobs: bool | None = None,
    top_logprobs: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
    user: str | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    min_tokens: int | None = None,
    ignore_eos: bool | None = None,
    stop_token_ids: Sequence[int] | None = None,
    extra_body: Mapping[str, Any] | None = None,
    extra_headers: Mapping[str, str] | None = None,
    timeout: TimeoutLike | NotGiven = NOT_GIVEN,
) -> RequestSpec[ChatCompletion, ChatCompletionChunk]:
    """POST /v1/chat/completions; `messages` are dicts (`{"role": "user", "content": "hi"}`) or
    `ChatMessage`s. `stream=True` gives an iterator of `ChatCompletionChunk`s. Other arguments as for
    `completions.create`."""
    body = _sampling_body(
        stream,
        include_usage,
        model=model,
        messages=_messages(messages),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        n=n,
        stop=stop if stop is None or isinstance(stop, str) else list(stop),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
        user=user,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
        stop_token_ids=None if stop_token_ids is None else list(stop_token_ids),
    )
    body.update(extra_body or {})
    return RequestSpec(
        "POST",
        "/v1/chat/completions",
        ChatCompletion,
        ChatCompletionChunk,
        stream,
        body,
        _headers(stream, extra_headers),
        _timeout(timeout),
    )


def _plain(prompt: Sequence[str] | Sequence[int] | Sequence[Sequence[int]]) -> list[Any]:
    return [p if isinstance(p, str | int) else list(p) for p in prompt]


def _messages(messages: Sequence[MessageLike]) -> list[dict[str, Any]]:
    return [m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else dict(m) for m in messages]


def models_request() -> RequestSpec[ModelList, ModelList]:
    return RequestSpec("GET", "/v1/models", ModelList, ModelList)


def tokenize_request(
    prompt: str | None = None,
    *,
    messages: Sequence[MessageLike] | None = None,
    model: str | None = None,
    add_special_tokens: bool | None = None,
    add_generation_prompt: bool | None = None,
) -> RequestSpec[TokenizeResponse, TokenizeResponse]:
    """POST /tokenize with a `prompt`, or with chat `messages` (the chat template applied)."""
    if (prompt is None) == (messages is None):
        raise ValueError("tokenize() takes exactly one of `prompt` and `messages`")
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "add_special_tokens": add_special_tokens,
        "add_generation_prompt": add_generation_prompt,
    }
    if messages is not None:
        body["messages"] = _messages(messages)
    body = {key: value for key, value in body.items() if value is not None}
    return RequestSpec("POST", "/tokenize", TokenizeResponse, TokenizeResponse, body=body)


def detokenize_request(
    tokens: Sequence[int], *, model: str | None = None
) -> RequestSpec[DetokenizeResponse, DetokenizeResponse]:
    """POST /detokenize: token ids back to text."""
    body: dict[str, Any] = {"tokens": list(tokens)}
    if model is not None:
        body["model"] = model
    return RequestSpec("POST", "/detokenize", DetokenizeResponse, DetokenizeResponse, body=body)


def version_request() -> RequestSpec[VersionResponse, VersionResponse]:
    return RequestSpec("GET", "/version", VersionResponse, VersionResponse)
