"""The asynchronous client: `AsyncClient` and `AsyncStream`, the same surface as `Client` with `await`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

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


async def _events(response: httpx.Response, chunk_type: type[C]) -> AsyncGenerator[C, None]:
    parser = SSEParser(chunk_type, response.request)
    try:
        async for line in response.aiter_lines():
            chunk = parser.feed(line)
            if parser.done:
                return
            if chunk is not None:
                yield chunk
        parser.finish()
    except httpx.TransportError as exc:
        raise wrap_transport_error(exc, response.request) from exc
    finally:
        await response.aclose()


class AsyncStream(Generic[C]):
    """Async iterator of typed chunks; raises if the connection breaks or the stream ends without [DONE].
    Use `async with` (or `await stream.close()`) to close the connection when leaving early."""

    def __init__(self, response: httpx.Response, chunk_type: type[C]) -> None:
        self.response = response
        self._iterator = _events(response, chunk_type)

    @property
    def request_id(self) -> str | None:
        request_id: str | None = self.response.headers.get(REQUEST_ID_HEADER)
        return request_id

    def __aiter__(self) -> AsyncIterator[C]:
        return self._iterator

    async def __anext__(self) -> C:
        return await self._iterator.__anext__()

    async def close(self) -> None:
        await self._iterator.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[C]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _endpoint(
    build: Callable[P, RequestSpec[R, C]],
) -> Callable[Concatenate[_Resource, P], Coroutine[Any, Any, R | AsyncStream[C]]]:
    @as_method(build, "{0} | AsyncStream[{1}]")
    async def call(self: _Resource, /, *args: P.args, **kwargs: P.kwargs) -> R | AsyncStream[C]:
        return await self._client._call(build(*args, **kwargs))

    return call


def _method(
    build: Callable[P, RequestSpec[R, C]],
) -> Callable[Concatenate[_Resource | AsyncClient, P], Coroutine[Any, Any, R]]:
    @as_method(build, "{0}")
    async def call(self: _Resource | AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        client = self if isinstance(self, AsyncClient) else self._client
        return await client._request(build(*args, **kwargs))

    return call


class _Resource:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client


class AsyncCompletions(_Resource):
    create = _endpoint(completion_request)


class AsyncChatCompletions(_Resource):
    create = _endpoint(chat_completion_request)


class AsyncChat(_Resource):
    def __init__(self, client: AsyncClient) -> None:
        super().__init__(client)
        self.completions = AsyncChatCompletions(client)


class AsyncModels(_Resource):
    list = _method(models_request)


class AsyncClient:
    """Asynchronous Fenwick client; arguments, retries and errors as for `Client`."""

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
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.options = ClientOptions.create(
            base_url, api_key, timeout, max_retries, backoff_base, backoff_max, headers
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient()
        self.completions = AsyncCompletions(self)
        self.chat = AsyncChat(self)
        self.models = AsyncModels(self)

    tokenize = _method(tokenize_request)
    detokenize = _method(detokenize_request)
    version = _method(version_request)

    async def health(self) -> bool:
        """True when the server is ready; False while it starts or drains (503). No retries."""
        request = self.options.health_request(self._http)
        try:
            response = await self._http.send(request)
        except httpx.TransportError as exc:
            raise wrap_transport_error(exc, request) from exc
        return health_result(response)

    async def _send(self, spec: RequestSpec[R, C]) -> httpx.Response:
        """Send with retries; returns a 2xx response (its body unread when `spec.stream`)."""
        attempt = 0
        while True:
            request = self.options.build_request(self._http, spec)
            error: APIError
            try:
                response = await self._http.send(request, stream=spec.stream)
                if response.is_success:
                    return response
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                error = status_error(response)
            except httpx.TransportError as exc:
                error = wrap_transport_error(exc, request)
            delay = self.options.retry.delay(attempt, error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    async def _request(self, spec: RequestSpec[R, C]) -> R:
        return parse_body(await self._send(spec), spec.cast_to)

    async def _call(self, spec: RequestSpec[R, C]) -> R | AsyncStream[C]:
        if spec.stream:
            return AsyncStream(await self._send(spec), spec.chunk_type)
        return await self._request(spec)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
