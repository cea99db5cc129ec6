"""fenwick_client against a scripted stub server on 127.0.0.1: retries, backoff, Retry-After, timeouts,
and broken connections. Endpoints and streams: test_client_stub_api.py; async: test_client_stub_async.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import fenwick_client as fc
import pytest

COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "tiny",
    "choices": [{"index": 0, "text": "hello", "finish_reason": "length"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
}


def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "finish_reason": finish}],
    }


def error(status: int, message: str = "nope", type_: str = "invalid_request_error") -> Reply:
    return Reply(status, {"error": {"message": message, "type": type_, "param": None, "code": str(status)}})


@dataclass
class Reply:
    """One scripted answer. `status=0` drops the connection without answering."""

    status: int = 200
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    hang: float = 0.0  # seconds to wait before answering
    events: list[Any] | None = None  # SSE `data:` payloads; the answer is a stream when set
    done: bool = True  # end the stream with `data: [DONE]`
    chunked: bool = True  # chunked transfer (a drop is then a protocol error) or close-delimited body
    drop: bool = False  # after the events, cut the connection mid-body
    event_delay: float = 0.0  # seconds between events
    stall: float = 0.0  # seconds to stall after the first event


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


class StubServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replies: deque[Reply] = deque()
        self.seen: list[Seen] = []
        self.stopping = threading.Event()
        self.disconnected = threading.Event()  # a stream's client went away before it ended
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def expect(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def next_reply(self) -> Reply:
        with self.lock:
            return self.replies.popleft() if self.replies else Reply(json=COMPLETION)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StubServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        stub = self.server
        stub.seen.append(
            Seen(
                self.command,
                self.path,
                dict(self.headers),
                json.loads(raw) if raw else None,
                time.monotonic(),
            )
        )
        reply = stub.next_reply()
        self.close_connection = True
        if reply.hang and stub.stopping.wait(reply.hang):
            return
        if reply.status == 0:
            self._drop()
            return
        try:
            if reply.events is None:
                self._plain(reply)
            else:
                self._stream(reply)
        except (BrokenPipeError, ConnectionResetError):
            stub.disconnected.set()

    def _plain(self, reply: Reply) -> None:
        body = json.dumps(reply.json).encode() if reply.json is not None else b""
        self.send_response(reply.status)
        for key, value in {
            "Content-Type": "application/json",
            "X-Request-Id": "req-42",
            **reply.headers,
        }.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        if reply.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        payloads = [json.dumps(e) if not isinstance(e, str) else e for e in reply.events or []]
        payloads += ["[DONE]"] if reply.done and not reply.drop else []
        for i, payload in enumerate(payloads):
            if self.server.stopping.wait(reply.event_delay if i else 0.0):
                return
            self._write(f"data: {payload}\n\n".encode(), reply.chunked)
            if i == 0 and reply.stall and self.server.stopping.wait(reply.stall):
                return
        if reply.drop:
            self._drop()
        elif reply.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _write(self, data: bytes, chunked: bool) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
        self.wfile.flush()

    def _drop(self) -> None:
        self.connection.shutdown(socket.SHUT_RDWR)


@contextmanager
def running_stub() -> Iterator[StubServer]:
    server = StubServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with running_stub() as server:
        yield server


def make_client(stub: StubServer, **kwargs: Any) -> fc.Client:
    options: dict[str, Any] = {
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "timeout": fc.Timeout(connect=2, read=5),
    }
    return fc.Client(stub.url, **{**options, **kwargs})


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_retryable_status_is_retried_max_retries_times(stub: StubServer, status: int) -> None:
    stub.expect(*[error(status)] * 3)
    with make_client(stub, max_retries=2) as client, pytest.raises(fc.APIStatusError) as info:
        client.completions.create(prompt="hi")
    assert len(stub.seen) == 3 and info.value.status_code == status
    assert isinstance(info.value, fc.InternalServerError) == (status >= 500)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, fc.BadRequestError),
        (401, fc.AuthenticationError),
        (404, fc.NotFoundError),
        (413, fc.RequestTooLargeError),
        (422, fc.UnprocessableEntityError),
        (418, fc.APIStatusError),
    ],
)
def test_other_4xx_are_never_retried(stub: StubServer, status: int, cls: type[fc.APIStatusError]) -> None:
    stub.expect(error(status, "bad prompt"))
    with make_client(stub, max_retries=3) as client, pytest.raises(cls) as info:
        client.completions.create(prompt="hi")
    assert len(stub.seen) == 1
    err = info.value
    assert (err.status_code, err.message, err.type, err.code, err.request_id) == (
        status,
        "bad prompt",
        "invalid_request_error",
        str(status),
        "req-42",
    )


def test_recovers_after_transient_errors(stub: StubServer) -> None:
    stub.expect(error(503), Reply(status=0), Reply(json=COMPLETION))
    with make_client(stub, max_retries=2) as client:
        assert client.completions.create(prompt="hi").choices[0].text == "hello"
    assert len(stub.seen) == 3


def test_retry_after_is_honoured(stub: StubServer) -> None:
    stub.expect(
        Reply(429, {"error": {"message": "queue full"}}, {"Retry-After": "1"}), Reply(json=COMPLETION)
    )
    with make_client(stub) as client:
        client.completions.create(prompt="hi")
    gap = stub.seen[1].at - stub.seen[0].at
    assert 0.9 <= gap < 3.0


def test_backoff_grows_exponentially(stub: StubServer) -> None:
    stub.expect(*[error(500)] * 4)
    with (
        make_client(stub, max_retries=3, backoff_base=0.1, backoff_max=10) as client,
        pytest.raises(fc.InternalServerError),
    ):
        client.completions.create(prompt="hi")
    gaps = [b.at - a.at for a, b in zip(stub.seen, stub.seen[1:], strict=False)]
    assert len(gaps) == 3
    for n, gap in enumerate(gaps):  # 0.1 * 2**n with jitter in [0.75, 1]
        assert 0.1 * 2**n * 0.7 <= gap < 0.1 * 2**n + 1.0


def test_read_timeout_fires_and_is_retried(stub: StubServer) -> None:
    stub.expect(*[Reply(hang=10)] * 2)
    with make_client(stub, max_retries=1, timeout=fc.Timeout(connect=2, read=0.2)) as client:
        start = time.monotonic()
        with pytest.raises(fc.APITimeoutError):
            client.completions.create(prompt="hi")
    assert len(stub.seen) == 2 and time.monotonic() - start < 2.0


def test_per_call_timeout_overrides_the_client_default(stub: StubServer) -> None:
    stub.expect(Reply(hang=10))
    with make_client(stub, max_retries=0) as client, pytest.raises(fc.APITimeoutError):
        client.completions.create(prompt="hi", timeout=0.2)


def test_connection_refused_raises_connection_error() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with fc.Client(f"http://127.0.0.1:{port}", max_retries=2, backoff_base=0.01) as client:
        with pytest.raises(fc.APIConnectionError) as info:
            client.completions.create(prompt="hi")
    assert not isinstance(info.value, fc.APITimeoutError)
