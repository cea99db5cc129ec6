"""One API server process of `fenwick serve` (server/launcher.py starts N of them): HTTP, validation,
tokenization, detokenization and SSE over an AsyncEngineClient, listening on the port beside the others
(SO_REUSEPORT). It imports no torch and never touches the GPU: the engine core owns it."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..engine.core_client import AsyncEngineClient
from ..engine.messages import EngineInfo
from ..engine.startup import configure_logging, freeze_heap
from ..engine.tokenizer import Tokenizer
from . import http_server
from .app import create_app
from .config import ServerConfig


@dataclass(frozen=True)
class ApiServerArgs:
    server_config: ServerConfig
    info: EngineInfo  # the engine core's, from its ready message
    address: str  # the engine core's ZMQ endpoint
    core_pid: int  # watched: if the core exits, every stream ends and this server exits 1
    launcher_pid: int  # watched too: nothing outlives `fenwick serve`


def run_api_server(args: ApiServerArgs) -> None:
    """The process's entry (spawned): serve until SIGTERM (drained) or the engine's death (exit 1)."""
    config = args.server_config
    configure_logging(config.log_level)
    engine = AsyncEngineClient(
        args.info, args.address, Tokenizer.from_dir(args.info.model), stream_interval=config.stream_interval,
        watch={args.core_pid: "the engine core process", args.launcher_pid: "fenwick serve's launcher"})
    app = create_app(engine, config)
    freeze_heap()  # the imported web stack out of the garbage collector's sight
    sock = http_server.listen(config.host, config.port, reuse_port=True)
    sys.exit(http_server.run(app, engine, config, sock))
