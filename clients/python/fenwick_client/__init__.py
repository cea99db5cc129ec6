"""fenwick_client: sync and async Python client for the Fenwick serving engine's OpenAI-compatible API.

from fenwick_client import Client

with Client("http://localhost:8000") as client:
    print(client.completions.create(prompt="Hello", max_tokens=16).choices[0].text)
"""

from __future__ import annotations

from fenwick_client._async_client import AsyncClient, AsyncStream
from fenwick_client._client import Client, Stream
from fenwick_client._params import NOT_GIVEN, json_schema_format
from fenwick_client._policy import RetryPolicy, Timeout
from fenwick_client._version import __version__
from fenwick_client.errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APIStreamError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    IncompleteStreamError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    RequestTooLargeError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from fenwick_client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Completion,
    CompletionChunk,
    DetokenizeResponse,
    Model,
    ModelList,
    TokenizeResponse,
    ToolCall,
    Usage,
    VersionResponse,
)

__all__ = [
    "NOT_GIVEN",
    "json_schema_format",
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APIStreamError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "Client",
    "Completion",
    "CompletionChunk",
    "ConflictError",
    "DetokenizeResponse",
    "IncompleteStreamError",
    "InternalServerError",
    "Model",
    "ModelList",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "RetryPolicy",
    "ServiceUnavailableError",
    "Stream",
    "Timeout",
    "TokenizeResponse",
    "UnprocessableEntityError",
    "ToolCall",
    "Usage",
    "VersionResponse",
    "__version__",
]
