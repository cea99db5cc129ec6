"""`fenwick serve`'s processes (DESIGN §5): one engine core, N API servers on one port, and this one,
which starts them in order and watches them. Every child is spawned, never forked: the core alone
initializes CUDA, and the API servers import no torch.

- Start: the core first; once it reports ready (model loaded, pool allocated, graphs captured), the API
  servers, each listening on the port with SO_REUSEPORT: the kernel spreads connections evenly over them
  (one shared socket would not: asyncio accepts every pending connection at once, so a burst lands on
  one process and, kept alive, stays there). The port is checked free first, so that a second server
  started by mistake fails instead of sharing it.
- SIGTERM / SIGINT: the API servers drain (running streams finish, new requests get 503), then the core
  is told to stop; exit 0. A second signal kills everything (exit 1).
- The core dies: the API servers, which watch it, end every open stream with an error event and exit;
  this process exits 1, so that Docker or Kubernetes restart the server.
- An API server dies: the core aborts its requests (ClientGone), a new one takes its place and the
  others serve on. One that dies again soon after its restart is a crash loop: everything stops (1).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import msgspec
import zmq

from ..engine.core_proc import run_engine_core
from ..engine.messages import ClientGone, EngineInfo, Shutdown
from .api_server import ApiServerArgs, run_api_server
from .config import ServerConfig

logger = logging.getLogger("fenwick.server")

CORE_DEATH_GRACE_S = 3.0  # after the core died: how long the API servers get to end their streams
STOP_GRACE_S = 10.0  # beyond the drain timeout, how long a process gets before it is killed
RESPAWN_WINDOW_S = 10.0  # a restarted API server that dies this soon after its start: a crash loop
TICK_S = 0.2  # how often the watch loop looks at signals when no process has exited


class Launcher:
    def __init__(self, engine_config: Any, server_config: ServerConfig) -> None:
        self.engine_config = engine_config  # engine.config.EngineConfig (pickled to the core only)
        self.server_config = server_config
        self.spawn = multiprocessing.get_context("spawn")
        self.signals = 0  # SIGTERM / SIGINT received
        self.core: BaseProcess | None = None
        self.servers: dict[int, tuple[BaseProcess, float]] = {}  # index -> (process, when it started)
        self.restarted: set[int] = set()  # indexes whose API server was replaced once
        self.args: ApiServerArgs | None = None

    def run(self) -> int:
        """Serve until a signal (0) or a failure (1)."""
        workdir = tempfile.mkdtemp(prefix="fenwick-serve-")
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run(workdir)
        finally:
            for process in [p for p, _ in self.servers.values()] + [self.core]:
                if process is not None and process.is_alive():
                    process.kill()
                    process.join(5)
            for s, handler in previous.items():
                signal.signal(s, handler)
            shutil.rmtree(workdir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1  # the watch loop acts on it (no logging here: it may hold the lock we would take)

    def _run(self, workdir: str) -> int:
        address = f"ipc://{workdir}/core"
        metrics_dir = os.path.join(workdir, "metrics")
        os.mkdir(metrics_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client in the API servers
        port = free_port(self.server_config.host, self.server_config.port)  # before minutes of loading
        if port is None:
            return 1
        info = self._start_core(address)
        if info is None:
            return 0 if self.signals else 1
        config = replace(self.server_config, port=port, metrics_dir=metrics_dir)
        assert self.core is not None and self.core.pid is not None
        self.args = ApiServerArgs(config, info, address, self.core.pid, os.getpid())
        logger.info("serving on http://%s:%d with %d API server(s)", config.host, config.port,
                    config.api_server_count)
        for i in range(config.api_server_count):
            self._start_server(i)
        context = zmq.Context()
        control = context.socket(zmq.DEALER)
        control.setsockopt(zmq.IDENTITY, b"launcher")
        control.setsockopt(zmq.LINGER, 1000)
        control.connect(address)
        try:
            return self._watch(lambda message: control.send(msgspec.msgpack.encode(message)))
        finally:
            control.close()
            context.term()

    def _start_core(self, address: str) -> EngineInfo | None:
        """Spawn the core and wait until it is ready; None if it failed (or a signal came first)."""
        reader, writer = self.spawn.Pipe(duplex=False)
        args = (self.engine_config, address, writer, self.server_config.log_level)
        self.core = self.spawn.Process(target=run_engine_core, name="fenwick-core", args=args)
        self.core.start()
        writer.close()
        logger.info("engine core: pid %s", self.core.pid)
        while not self.signals:
            if not wait([reader, self.core.sentinel], timeout=TICK_S):
                continue
            try:
                kind, payload = reader.recv()
            except EOFError:
                logger.error("the engine core exited while starting (exit code %s)", self.core.exitcode)
                return None
            if kind == "ready":
                return payload
            logger.error("the engine core failed to start: %s", payload)
            return None
        return None

    def _start_server(self, index: int) -> None:
        process = self.spawn.Process(target=run_api_server, name=f"fenwick-api-{index}", args=(self.args,))
        process.start()
        self.servers[index] = (process, time.monotonic())
        logger.info("API server %d: pid %s", index, process.pid)

    def _watch(self, send: Callable[[Any], None]) -> int:
        """Watch the processes until they have all stopped; the exit code."""
        assert self.core is not None
        draining_since: float | None = None
        failed = False
        while True:
            wait([self.core.sentinel] + [p.sentinel for p, _ in self.servers.values()], timeout=TICK_S)
            if self.signals > 1:
                logger.error("a second signal: stopping at once")
                return 1
            if self.signals and draining_since is None:
                draining_since = self._drain()
            if not self.core.is_alive():
                logger.error("the engine core exited (exit code %s): stopping", self.core.exitcode)
                self._stop_servers(CORE_DEATH_GRACE_S)
                return 1
            for index, (process, started) in list(self.servers.items()):
                if process.is_alive():
                    continue
                del self.servers[index]
                send(ClientGone(process.pid or 0))
                if draining_since is not None:
                    continue
                logger.error("API server %d (pid %s) exited (exit code %s)", index, process.pid,
                             process.exitcode)
                if index in self.restarted and time.monotonic() - started < RESPAWN_WINDOW_S:
                    logger.error("API server %d keeps dying: stopping", index)
                    failed, draining_since = True, self._drain()
                    continue
                self.restarted.add(index)
                self._start_server(index)
            if draining_since is None:
                continue
            if not self.servers:
                send(Shutdown())
                self.core.join(STOP_GRACE_S)
                return 1 if failed or self.core.exitcode != 0 else 0
            if time.monotonic() - draining_since > self.server_config.shutdown_timeout + STOP_GRACE_S:
                logger.error("the API servers did not drain in time: killing them")
                for process, _ in self.servers.values():
                    process.kill()

    def _drain(self) -> float:
        logger.info("stopping: draining %d API server(s)", len(self.servers))
        for process, _ in self.servers.values():
            process.terminate()  # uvicorn's graceful shutdown: in-flight responses finish
        return time.monotonic()

    def _stop_servers(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for process, _ in self.servers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()


def free_port(host: str, port: int) -> int | None:
    """The port (port 0: a free one), if nothing listens on it; None, logged, if something does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            logger.error("cannot listen on %s:%d: %s", host, port, e)
            return None
        return int(probe.getsockname()[1])


def launch(engine_config: Any, server_config: ServerConfig) -> int:
    return Launcher(engine_config, server_config).run()
