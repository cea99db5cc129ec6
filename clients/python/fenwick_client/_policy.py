"""What the sync and async clients share apart from the transport: options, timeouts, the retry policy,
turning an httpx outcome into a result or a typed error, and the SSE stream protocol."""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from fenwick_client._version import __version__
from fenwick_client.errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APIStreamError,
    APITimeoutError,
    IncompleteStreamError,
    status_error,
)
from fenwick_client.types import ErrorBody

if TYPE_CHECKING:
    from fenwick_client._params import RequestSpec

R = TypeVar("R", bound=BaseModel)

RETRY_STATUSES = frozenset({408, 429})
MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True)
class Timeout:
    """Separate limits, in seconds: `connect` to open a connection, `read` between two received bytes
    (a stream that stalls longer than `read` raises `APITimeoutError`), `write` and `pool`."""

    connect: float | None = 5.0
    read: float | None = 600.0
    write: float | None = 60.0
    pool: float | None = 60.0

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


TimeoutLike = float | Timeout | httpx.Timeout | None


def to_httpx_timeout(timeout: TimeoutLike) -> httpx.Timeout:
    if isinstance(timeout, Timeout):
        return timeout.to_httpx()
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n (0-based) waits `backoff_base * 2**n`, capped at
    `backoff_max`, times a factor in [1 - jitter, 1]; a `Retry-After` header up to `MAX_RETRY_AFTER`
    seconds replaces that delay. Retries connection errors, timeouts, 408, 429 and 5xx; never other 4xx."""

    max_retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    jitter: float = 0.25

    def delay(self, attempt: int, error: APIError) -> float | None:
        """Seconds to wait before retrying after `error` on attempt `attempt`, or None to give up."""
        if attempt >= self.max_retries or not is_retryable(error):
            return None
        if isinstance(error, APIStatusError):
            retry_after = parse_retry_after(error.response.headers)
            if retry_after is not None:
                return retry_after
        backoff = min(self.backoff_max, self.backoff_base * 2.0**attempt)
        return backoff * (1.0 - self.jitter * random.random())


def is_retryable(error: APIError) -> bool:
    if isinstance(error, APIStatusError):
        return error.status_code in RETRY_STATUSES or error.status_code >= 500
    return isinstance(error, APIConnectionError)


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """`retry-after-ms`, or `Retry-After` as seconds or an HTTP date; None when absent or unreasonable."""
    seconds: float | None = None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            seconds = float(ms) / 1000.0
        except ValueError:
            pass
    if seconds is None and (value := headers.get("retry-after")) is not None:
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = None
    if seconds is None or not 0.0 <= seconds <= MAX_RETRY_AFTER:
        return None
    return seconds


@dataclass(frozen=True)
class ClientOptions:
    """Everything a client is constructed with, normalised once."""

    base_url: str
    api_key: str | None
    timeout: httpx.Timeout
    retry: RetryPolicy
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        base_url: str,
        api_key: str | None,
        timeout: TimeoutLike,
        max_retries: int,
        backoff_base: float,
        backoff_max: float,
        headers: Mapping[str, str] | None,
    ) -> ClientOptions:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        root = base_url.rstrip("/")
        if root.endswith("/v1"):  # the server root is wanted; accept an OpenAI-style base URL too
            root = root[: -len("/v1")]
        return cls(
            base_url=root,
            api_key=api_key,
            timeout=to_httpx_timeout(timeout),
            retry=RetryPolicy(max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max),
            headers=dict(headers or {}),
        )

    def default_headers(self) -> dict[str, str]:
        out = {"User-Agent": f"fenwick-client/{__version__}", "Accept": "application/json"}
        if self.api_key:
            out["Authorization"] = f"Bearer {self.api_key}"
        out.update(self.headers)
        return out

    def build_request(
        self, http: httpx.Client | httpx.AsyncClient, spec: RequestSpec[Any, Any]
    ) -> httpx.Request:
        """One attempt at `spec`: its path under `base_url`, its headers and timeout over the client's."""
        return http.build_request(
            spec.method,
            self.base_url + spec.path,
            json=spec.body,
            headers={**self.default_headers(), **spec.headers},
            timeout=self.timeout if spec.timeout is None else spec.timeout,
        )

    def health_request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        """GET /health, under the HTTP client's own timeout."""
        return http.build_request("GET", f"{self.base_url}/health", headers=self.default_headers())


def wrap_transport_error(exc: httpx.TransportError, request: httpx.Request | None) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"Request timed out ({type(exc).__name__}).", request=request)
    return APIConnectionError(f"Connection error: {type(exc).__name__}: {exc}", request=request)


def parse_body(response: httpx.Response, cast_to: type[R]) -> R:
    try:
        return cast_to.model_validate_json(response.content)
    except ValidationError as exc:
        raise APIResponseValidationError(
            f"Unexpected {cast_to.__name__} body: {exc}", request=response.request
        ) from exc


class SSEParser(Generic[R]):
    """The server-sent-events protocol of a completion stream, fed one line at a time.

    Yields the typed chunk of each `data:` event, stops at `data: [DONE]` (`done`), raises `APIStreamError`
    on an `{"error": ...}` event and `IncompleteStreamError` from `finish()` when the stream ended early.
    """

    def __init__(self, chunk_type: type[R], request: httpx.Request | None) -> None:
        self.chunk_type = chunk_type
        self.request = request
        self.done = False
        self._data: list[str] = []

    def feed(self, line: str) -> R | None:
        """One line without its terminator; returns a chunk when the line completes an event."""
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def _dispatch(self) -> R | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        if data.strip() == "[DONE]":
            self.done = True
            return None
        try:
            payload: Any = json.loads(data)
        except ValueError as exc:
            raise APIResponseValidationError(
                f"Invalid JSON in stream: {data!r}", request=self.request
            ) from exc
        error = ErrorBody.from_payload(payload)
        if error is not None:
            raise APIStreamError(error, request=self.request)
        try:
            return self.chunk_type.model_validate(payload)
        except ValidationError as exc:
            raise APIResponseValidationError(f"Unexpected chunk: {exc}", request=self.request) from exc

    def finish(self) -> None:
        """End of the byte stream: a last event without its blank line still counts; insist on [DONE]."""
        self._dispatch()
        if not self.done:
            raise IncompleteStreamError(request=self.request)


def health_result(response: httpx.Response) -> bool:
    """GET /health: True when serving, False while starting or draining (503); other statuses raise."""
    if response.is_success:
        return True
    if response.status_code == 503:
        return False
    raise status_error(response)
