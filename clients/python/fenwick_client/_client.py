"""The synchronous client: `Client`, and `Stream` over a server-sent-events response."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Mapping
from types import TracebackType
from typing import Concatenate, Generic, ParamSpec, TypeVar

import httpx
from pydantic import BaseModel

from fenwick_client._params import (
    RequestSpec,
    as_method,
    chat_completion_request,
    completion_request,
    detokenize_request,
    models_request,
    tokenize_request,
    version_request,
)
from fenwick_client._policy import (
    ClientOptions,
    SSEParser,
    Timeout,
    TimeoutLike,
    health_result,
    parse_body,
    wrap_transport_error,
)
from fenwick_client.errors import REQUEST_ID_HEADER, APIError, status_error

P = ParamSpec("P")
R = TypeVar("R", bound=BaseModel)
C = TypeVar("C", bound=BaseModel)


def _events(response: httpx.Response, chunk_type: type[C]) -> Generator[C, None, None]:
    parser = SSEParser(chunk_type, response.request)
    try:
        for line in response.iter_lines():
            chunk = parser.feed(line)
            if parser.done:
                return
            if chunk is not None:
                yield chunk
        parser.finish()
    except httpx.TransportError as exc:
        raise wrap_transport_error(exc, response.request) from exc
    finally:
        response.close()


class Stream(Generic[C]):
    """Iterator of typed chunks. Raises if the connection breaks or the stream ends without [DONE];
    closes the connection when exhausted, on `close()`, on leaving a `with` block, or when dropped."""

    def __init__(self, response: httpx.Response, chunk_type: type[C]) -> None:
        self.response = response
        self._iterator = _events(response, chunk_type)  # holds no reference back to the Stream

    @property
    def request_id(self) -> str | None:
        request_id: str | None = self.response.headers.get(REQUEST_ID_HEADER)
        return request_id

    def __iter__(self) -> Iterator[C]:
        return self._iterator

    def __next__(self) -> C:
        return next(self._iterator)

    def close(self) -> None:
        self._iterator.close()
        self.response.close()

    def __enter__(self) -> Stream[C]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _endpoint(build: Callable[P, RequestSpec[R, C]]) -> Callable[Concatenate[_Resource, P], R | Stream[C]]:
    @as_method(build, "{0} | Stream[{1}]")
    def call(self: _Resource, /, *args: P.args, **kwargs: P.kwargs) -> R | Stream[C]:
        return self._client._call(build(*args, **kwargs))

    return call


def _method(build: Callable[P, RequestSpec[R, C]]) -> Callable[Concatenate[_Resource | Client, P], R]:
    @as_method(build, "{0}")
    def call(self: _Resource | Client, /, *args: P.args, **kwargs: P.kwargs) -> R:
        client = self if isinstance(self, Client) else self._client
        return client._request(build(*args, **kwargs))

    return call


class _Resource:
    def __init__(self, client: Client) -> None:
        self._client = client


class Completions(_Resource):
    create = _endpoint(completion_request)


class ChatCompletions(_Resource):
    create = _endpoint(chat_completion_request)


class Chat(_Resource):
    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.completions = ChatCompletions(client)


class Models(_Resource):
    list = _method(models_request)


class Client:
    """Synchronous Fenwick client. `base_url` is the server root (a trailing `/v1` is accepted).

    `timeout` is seconds, a `Timeout(connect=5, read=600)` or an `httpx.Timeout`. Failed calls are retried
    up to `max_retries` times with exponential backoff from `backoff_base` seconds (capped at
    `backoff_max`) and jitter, honouring `Retry-After`, on connection errors, timeouts, 408, 429 and 5xx.
    """

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        api_key: str | None = None,
        *,
        timeout: TimeoutLike = Timeout(),
        max_retries: int = 2,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.options = ClientOptions.create(
            base_url, api_key, timeout, max_retries, backoff_base, backoff_max, headers
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client()
        self.completions = Completions(self)
        self.chat = Chat(self)
        self.models = Models(self)

    tokenize = _method(tokenize_request)
    detokenize = _method(detokenize_request)
    version = _method(version_request)

    def health(self) -> bool:
        """True when the server is ready; False while it starts or drains (503). No retries."""
        request = self.options.health_request(self._http)
        try:
            response = self._http.send(request)
        except httpx.TransportError as exc:
            raise wrap_transport_error(exc, request) from exc
        return health_result(response)

    def _send(self, spec: RequestSpec[R, C]) -> httpx.Response:
        """Send with retries; returns a 2xx response (its body unread when `spec.stream`)."""
        attempt = 0
        while True:
            request = self.options.build_request(self._http, spec)
            error: APIError
            try:
                response = self._http.send(request, stream=spec.stream)
                if response.is_success:
                    return response
                try:
                    response.read()
                finally:
                    response.close()
                error = status_error(response)
            except httpx.TransportError as exc:
                error = wrap_transport_error(exc, request)
            delay = self.options.retry.delay(attempt, error)
            if delay is None:
                raise error
            time.sleep(delay)
            attempt += 1

    def _request(self, spec: RequestSpec[R, C]) -> R:
        return parse_body(self._send(spec), spec.cast_to)

    def _call(self, spec: RequestSpec[R, C]) -> R | Stream[C]:
        if spec.stream:
            return Stream(self._send(spec), spec.chunk_type)
        return self._request(spec)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
