"""The HTTP edge, as plain ASGI (so streaming and disconnects pass through untouched): request ids,
the API key, the body-size limit and the per-status counter."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body

logger = logging.getLogger("fenwick.server")

REQUEST_ID_KEY = "fenwick.request_id"  # where the request id lives in the ASGI scope
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        count: Callable[[str, int], None],
        known_paths: frozenset[str],
    ) -> None:
        self.app = app
        self.api_key = api_key
        # compared as digests: constant time whatever the lengths of the key and the guess
        self._key_digest = hashlib.sha256(api_key.encode()).digest() if api_key is not None else b""
        self.max_body_bytes = max_body_bytes
        self.count = count  # (path, status) for every response
        self.known_paths = known_paths  # label values for the counter; anything else counts as "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and len(given) <= 200 else uuid.uuid4().hex
        scope[REQUEST_ID_KEY] = request_id
        path = scope["path"] if scope["path"] in self.known_paths else "other"

        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
                self.count(path, int(message["status"]))
            await send(message)

        if (
            self.api_key is not None
            and scope["path"].startswith(PROTECTED_PREFIXES)
            and not self._authorized(scope)
        ):
            await self._reject(
                send_wrapper,
                401,
                "invalid or missing API key (send 'Authorization: Bearer KEY')",
                "invalid_api_key",
            )
            return

        if scope["method"] in ("POST", "PUT", "PATCH"):
            replay = await self._read_body(scope, receive)
            if replay is None:
                await self._reject(
                    send_wrapper,
                    413,
                    f"request body exceeds {self.max_body_bytes} bytes",
                    "request_too_large",
                )
                return
            receive = replay
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:  # a bug, never the client's input: a counted 500 that carries the request id
            logger.exception(
                "unhandled error in %s %s (request id %s)", scope["method"], scope["path"], request_id
            )
            if not started:
                await self._reject(send_wrapper, 500, "internal server error", "internal_error")

    def _authorized(self, scope: Scope) -> bool:
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(digest, self._key_digest) and scheme.lower() == "bearer"

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """Read the whole body up front (the handlers would anyway); None when it is too large."""
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _replay([message], receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)

    @staticmethod
    async def _reject(send: Send, status: int, message: str, code: str) -> None:
        body = json.dumps(error_body(status, message, code=code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if status == 413:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
