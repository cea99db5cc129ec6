"""SIGTERM's drain as the requests see it: new requests get 503, and streams still running when the
graceful timeout is about to cut them end with an error event (then [DONE]) instead of mid-stream."""

from __future__ import annotations

import asyncio

from .errors import ServerShutdownError
from .request_stream import RequestStream


class Shutdown:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s  # the graceful timeout the HTTP server gives running requests
        self.draining = False  # set once SIGTERM's shutdown has begun
        self.streams: set[RequestStream] = set()  # engine streams of the responses in flight

    def begin(self) -> None:
        """Called on the event loop when the HTTP server starts shutting down."""
        if self.draining:
            return
        self.draining = True
        margin = min(1.0, self.timeout_s / 10)  # end the streams just before the server cancels them
        asyncio.get_running_loop().call_later(max(0.0, self.timeout_s - margin), self._expire)

    def _expire(self) -> None:
        for stream in list(self.streams):
            stream.fail(ServerShutdownError(
                f"the server is shutting down and its {self.timeout_s:g} s drain ended before this request"))

    def check(self) -> None:
        if self.draining:
            raise ServerShutdownError("the server is shutting down")
