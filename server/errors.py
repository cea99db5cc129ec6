"""Errors in OpenAI's shape {"error": {"message", "type", "param", "code"}} and their handlers."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.errors import (
    EngineDeadError,
    EngineError,
    PromptTooLongError,
    QueueFullError,
    RequestFailedError,
)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ServerShutdownError(EngineError):
    """The server is shutting down (HTTP 503, or an in-band error event on a stream)."""


class APIError(Exception):
    """An error the client caused or should retry; rendered as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    body = error_body(err.status, err.message, err.param, err.code)
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_engine_error(exc: EngineError) -> APIError:
    if isinstance(exc, QueueFullError):
        retry = max(1, round(exc.retry_after))
        return APIError(429, str(exc), code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param="prompt", code="context_length_exceeded")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc) or "the engine has stopped", code="engine_dead")
    if isinstance(exc, RequestFailedError):  # a bug in the engine, never the client's input
        return APIError(500, str(exc), code="internal_error")
    if isinstance(exc, ServerShutdownError):
        return APIError(503, str(exc), code="server_shutdown", headers={"Connection": "close"})
    return bad_request(str(exc))


def from_value_error(exc: ValueError) -> APIError:
    """SamplingParams and the schemas raise ValueError("<field> must ..."): name the field as `param`."""
    message = str(exc)
    first = message.split(" ", 1)[0]
    return bad_request(message, param=first if first.isidentifier() else None)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A readable message and OpenAI's `param` (the top-level field) from pydantic's errors."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('msg', '')}", None
    # drop "body" and the union-member tags pydantic puts in the location ("str", "list[int]", ...)
    loc = [
        str(x) for x in first.get("loc", ()) if x != "body" and str(x) not in _TYPE_TAGS and "[" not in str(x)
    ]
    same_field = [e for e in errors if [str(x) for x in e.get("loc", ()) if x != "body"][:1] == loc[:1]]
    if len(same_field) > 1 and len(same_field) == len(errors) and loc:
        return f"{'.'.join(loc)}: the value matches none of the allowed types ({first.get('msg')})", loc[0]
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    where = f"{'.'.join(loc)}: " if loc else ""
    return f"{where}{first.get('msg', 'invalid value')}{more}", (loc[0] if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(bad_request(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        return error_response(from_engine_error(exc))
