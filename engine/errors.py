"""Errors the engine raises for requests; the server maps them to HTTP statuses."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for request errors."""


class InvalidRequestError(EngineError, ValueError):
    """Bad parameters or prompt (HTTP 400)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus max_tokens) does not fit max_model_len (HTTP 400)."""


class QueueFullError(EngineError):
    """The waiting queue is full (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(EngineError):
    """The step loop has stopped (HTTP 503)."""


class RequestFailedError(EngineError):
    """The engine failed while handling this request (a bug, HTTP 500); the other requests go on."""
