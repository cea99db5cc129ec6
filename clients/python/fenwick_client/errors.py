"""Typed exceptions. Every error the client raises is an `APIError`.

APIError
├── APIConnectionError          the server could not be reached, or the connection broke
│   ├── APITimeoutError         connect or read timeout
│   └── IncompleteStreamError   a stream ended without `data: [DONE]`
├── APIStreamError              the server sent an error event inside a stream
├── APIResponseValidationError  a 2xx body that is not the expected shape
└── APIStatusError              a non-2xx response; one subclass per status (below)
"""

from __future__ import annotations

import httpx

from fenwick_client.types import ErrorBody

REQUEST_ID_HEADER = "x-request-id"


class APIError(Exception):
    """Base class: `message`, plus the request that failed when there was one."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APIConnectionError(APIError):
    def __init__(self, message: str = "Connection error.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError):
    def __init__(self, message: str = "Request timed out.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class IncompleteStreamError(APIConnectionError):
    def __init__(
        self, message: str = "Stream ended without `data: [DONE]`.", *, request: httpx.Request | None = None
    ) -> None:
        super().__init__(message, request=request)


class APIResponseValidationError(APIError):
    pass


class APIStreamError(APIError):
    """An `{"error": {...}}` event in the middle of an SSE stream."""

    def __init__(self, error: ErrorBody, *, request: httpx.Request | None = None) -> None:
        super().__init__(error.message or "Error in stream.", request=request)
        self.type = error.type
        self.param = error.param
        self.code = error.code


class APIStatusError(APIError):
    """A non-2xx response, carrying the server's error (`{"error": {message, type, param, code}}`)."""

    status_code: int

    def __init__(self, message: str, *, response: httpx.Response, body: ErrorBody | None) -> None:
        super().__init__(message, request=response.request)
        self.response = response
        self.status_code = response.status_code
        self.body = body
        self.type = body.type if body else None
        self.param = body.param if body else None
        self.code = body.code if body else None
        self.request_id = response.headers.get(REQUEST_ID_HEADER)

    def __str__(self) -> str:
        rid = f" (request id {self.request_id})" if self.request_id else ""
        return f"Error code {self.status_code}: {self.message}{rid}"


class BadRequestError(APIStatusError):
    status_code = 400


class AuthenticationError(APIStatusError):
    status_code = 401


class PermissionDeniedError(APIStatusError):
    status_code = 403


class NotFoundError(APIStatusError):
    status_code = 404


class RequestTimeoutError(APIStatusError):
    status_code = 408


class ConflictError(APIStatusError):
    status_code = 409


class RequestTooLargeError(APIStatusError):
    status_code = 413


class UnprocessableEntityError(APIStatusError):
    status_code = 422


class RateLimitError(APIStatusError):
    status_code = 429


class InternalServerError(APIStatusError):
    """Any 5xx."""


class ServiceUnavailableError(InternalServerError):
    status_code = 503


_BY_STATUS: dict[int, type[APIStatusError]] = {
    cls.status_code: cls
    for cls in (
        BadRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        RequestTimeoutError,
        ConflictError,
        RequestTooLargeError,
        UnprocessableEntityError,
        RateLimitError,
        ServiceUnavailableError,
    )
}


def status_error(response: httpx.Response) -> APIStatusError:
    """The exception for a non-2xx response whose body has been read."""
    body: ErrorBody | None = None
    try:
        body = ErrorBody.from_payload(response.json())
    except ValueError:
        pass
    message = body.message if body and body.message else (response.text or response.reason_phrase)
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = InternalServerError if response.status_code >= 500 else APIStatusError
    return cls(message, response=response, body=body)
