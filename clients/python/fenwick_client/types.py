"""Typed responses of the Fenwick HTTP API (OpenAI's shapes plus Fenwick's /tokenize and /detokenize).

Every model accepts fields it does not know, so a newer server never breaks an older client.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(_Model):
    tokens: list[str] | None = None
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] | None = None


class CompletionChoice(_Model):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(_Model):
    """Response of POST /v1/completions; also each chunk of its stream (`object: text_completion`)."""

    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = []
    usage: Usage | None = None


CompletionChunk = Completion


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(_Model):
    content: list[TokenLogprob] | None = None


class FunctionCall(_Model):
    name: str
    arguments: str  # JSON text of the arguments object

    def parsed_arguments(self) -> Any:
        return json.loads(self.arguments)


class ToolCall(_Model):
    id: str
    type: str = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "tool", "developer"] | str
    content: str | list[dict[str, Any]] | None = None  # a string, or OpenAI's content parts
    tool_calls: list[ToolCall] | None = None  # an assistant turn's function calls
    tool_call_id: str | None = None  # a "tool" turn: the call it answers


class ChatChoice(_Model):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Model):
    """Response of POST /v1/chat/completions."""

    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice] = []
    usage: Usage | None = None


class ChoiceDeltaFunction(_Model):
    name: str | None = None  # in a call's first delta
    arguments: str | None = None  # a piece of the arguments' JSON text


class ChoiceDeltaToolCall(_Model):
    index: int  # which call of the message; its first delta also has id, type and the function's name
    id: str | None = None
    type: str | None = None
    function: ChoiceDeltaFunction | None = None


class ChoiceDelta(_Model):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class ChatChunkChoice(_Model):
    index: int = 0
    delta: ChoiceDelta = ChoiceDelta()
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Model):
    """One event of a chat stream; the last one carries only `usage` when `include_usage` is set."""

    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChatChunkChoice] = []
    usage: Usage | None = None


class Model(_Model):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "fenwick"
    max_model_len: int | None = None


class ModelList(_Model):
    object: str = "list"
    data: list[Model] = []


class TokenizeResponse(_Model):
    tokens: list[int]
    count: int
    max_model_len: int | None = None


class DetokenizeResponse(_Model):
    prompt: str


class VersionResponse(_Model):
    version: str = ""


class ErrorBody(_Model):
    """The `error` object of OpenAI's error shape."""

    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | int | None = None

    @classmethod
    def from_payload(cls, payload: Any) -> ErrorBody | None:
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            return cls.model_validate(payload["error"])
        return None
