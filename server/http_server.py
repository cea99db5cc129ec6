"""uvicorn as `fenwick serve` runs it: h11 with a header-size cap and a deadline for the request line
and headers (a client that trickles them holds a connection for ever otherwise), a shutdown that tells
the app when SIGTERM's drain starts, and a non-zero exit when the engine's loop has died."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ServerConfig

logger = logging.getLogger("fenwick.server")


def header_limited_h11(header_timeout: float, max_header_bytes: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose request line and headers take too long or
    are too large (h11's own cap only counts headers that have not fully arrived yet)."""

    class HeaderDeadlineH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _header_bytes = 0  # bytes of the current request line and headers received so far

        def _arm(self) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._arm()  # the next request's headers on a kept-alive connection start a new deadline
            if self.conn.their_state is h11.IDLE:
                end = data.find(b"\r\n\r\n")
                self._header_bytes += len(data) if end < 0 else end + 4
                if self._header_bytes > max_header_bytes:
                    self.send_400_response(f"request line and headers exceed {max_header_bytes} bytes")
                    return
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()
                self._header_bytes = 0

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineH11


class FenwickServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.fenwick_app = app
        self.engine_died = False

    def engine_death(self, error: BaseException) -> None:
        """An engine death listener: stop serving; the process then exits non-zero."""
        logger.error("the engine's loop has died (%r): shutting down", error)
        self.engine_died = True
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.fenwick_app.state.shutdown.begin()
        await super().shutdown(sockets)


def listen(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket; reuse_port: one of several processes' on the same port. Its protocol is TCP by
    name, as asyncio's own are: the sockets it accepts then get TCP_NODELAY from asyncio (with protocol 0
    they keep Nagle's algorithm, which holds the first streamed chunk back for a delayed ACK, ~40 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, socket.IPPROTO_TCP)[0][4]
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(2048)
    return sock


def run(app: FastAPI, engine: Any, config: ServerConfig, sock: socket.socket | None = None) -> int:
    """Serve until SIGTERM / SIGINT (0) or until the engine dies (1); on `sock` if given (http_server.listen),
    else on config.host and config.port."""
    uvicorn_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        lifespan="on",
        http=header_limited_h11(config.header_timeout, config.max_header_bytes),
        h11_max_incomplete_event_size=config.max_header_bytes,
        limit_concurrency=config.max_connections,
        timeout_graceful_shutdown=config.shutdown_timeout,  # type: ignore[arg-type]
    )
    server = FenwickServer(uvicorn_config, app)
    add_death_listener = getattr(engine, "add_death_listener", None)
    if add_death_listener is not None:
        add_death_listener(server.engine_death)
    server.run(sockets=None if sock is None else [sock])
    return 1 if server.engine_died else 0
