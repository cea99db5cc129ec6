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


def _jsonable(value: Any) -> Any:
    """Sequences (but strings) as lists, `ChatMessage`s and other mappings as dicts."""
    if isinstance(value, ChatMessage):
        return value.model_dump(exclude_none=True)
    if isinstance(value, type) and issubclass(value, BaseModel):  # response_format=SomeModel
        return json_schema_format(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_jsonable(item) for item in value]
    return value


def json_schema_format(model: type[BaseModel], strict: bool = True) -> dict[str, Any]:
    """`response_format` asking for JSON that validates against a pydantic model's JSON Schema."""
    return {"type": "json_schema",
            "json_schema": {"name": model.__name__, "schema": model.model_json_schema(), "strict": strict}}


ResponseFormat = Mapping[str, Any] | type[BaseModel]


def _body(args: Mapping[str, Any], *leave_out: str) -> dict[str, Any]:
    """The JSON body from a builder's arguments (its `locals()`), less those left at None or named."""
    return {
        key: _jsonable(value) for key, value in args.items() if value is not None and key not in leave_out
    }


def _sampling_request(
    path: str, cast_to: type[R], chunk_type: type[C], args: dict[str, Any]
) -> RequestSpec[R, C]:
    """A completions-style request from its builder's `locals()`: every argument is a body field but
    `include_usage` (sent as `stream_options`), `extra_body` (merged in), `extra_headers` and `timeout`."""
    stream: bool = args["stream"]
    body = _body(args, "include_usage", "extra_body", "extra_headers", "timeout")
    if stream and args["include_usage"] is not None:
        body["stream_options"] = {"include_usage": args["include_usage"]}
    body.update(args["extra_body"] or {})
    headers = {**({"Accept": "text/event-stream"} if stream else {}), **(args["extra_headers"] or {})}
    timeout = None if isinstance(args["timeout"], NotGiven) else to_httpx_timeout(args["timeout"])
    return RequestSpec("POST", path, cast_to, chunk_type, stream, body, headers, timeout)


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
    response_format: ResponseFormat | None = None,
    structured_outputs: Mapping[str, Any] | None = None,
    extra_body: Mapping[str, Any] | None = None,
    extra_headers: Mapping[str, str] | None = None,
    timeout: TimeoutLike | NotGiven = NOT_GIVEN,
) -> RequestSpec[Completion, Completion]:
    """POST /v1/completions. `stream=True` gives an iterator of `Completion` chunks; `include_usage` asks
    for a last chunk carrying `usage`. `top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`
    and `stop_token_ids` are Fenwick's sampling extras; `extra_body` adds raw fields.
    `response_format` is OpenAI's (`{"type": "json_schema", ...}`, or a pydantic model class);
    `structured_outputs` is Fenwick's constraint extra, one of `{"json": schema}`, `{"json_object": True}`,
    `{"regex": ...}`, `{"choice": [...]}` or `{"grammar": lark_or_gbnf}`."""
    return _sampling_request("/v1/completions", Completion, Completion, locals())


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
    response_format: ResponseFormat | None = None,
    structured_outputs: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
    extra_body: Mapping[str, Any] | None = None,
    extra_headers: Mapping[str, str] | None = None,
    timeout: TimeoutLike | NotGiven = NOT_GIVEN,
) -> RequestSpec[ChatCompletion, ChatCompletionChunk]:
    """POST /v1/chat/completions; `messages` are dicts (`{"role": "user", "content": "hi"}`) or
    `ChatMessage`s. `stream=True` gives an iterator of `ChatCompletionChunk`s. `tools` are OpenAI's
    function tools and `tool_choice` "none", "auto", "required" or `{"type": "function", "function":
    {"name": ...}}`: calls come back in `message.tool_calls` (`delta.tool_calls` when streaming). Other
    arguments as for `completions.create`."""
    return _sampling_request("/v1/chat/completions", ChatCompletion, ChatCompletionChunk, locals())


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
    return RequestSpec("POST", "/tokenize", TokenizeResponse, TokenizeResponse, body=_body(locals()))


def detokenize_request(
    tokens: Sequence[int], *, model: str | None = None
) -> RequestSpec[DetokenizeResponse, DetokenizeResponse]:
    """POST /detokenize: token ids back to text."""
    return RequestSpec("POST", "/detokenize", DetokenizeResponse, DetokenizeResponse, body=_body(locals()))


def version_request() -> RequestSpec[VersionResponse, VersionResponse]:
    return RequestSpec("GET", "/version", VersionResponse, VersionResponse)
