"""`fenwick serve`: configuration is read here, once, and passed down frozen."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..models import demo_model_dir
from .config import ServerConfig, sampling_defaults_from_generation_config

DEMO_MODEL = demo_model_dir()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fenwick", description="Fenwick: serve log-linear attention models")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"model directory (config.json, model.safetensors, tokenizer.json); "
        f"default: the bundled demo model {DEMO_MODEL}",
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=os.environ.get("FENWICK_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $FENWICK_API_KEY)",
    )
    serve.add_argument(
        "--served-model-name",
        default=None,
        help="the model's name in the API (default: the model directory's name)",
    )
    serve.add_argument(
        "--max-num-seqs", type=int, default=None, help="requests decoded together (state slots)"
    )
    serve.add_argument(
        "--max-model-len", type=int, default=None, help="longest prompt + completion, in tokens"
    )
    serve.add_argument(
        "--max-waiting", type=int, default=None, help="queued requests beyond the running ones; more get 429"
    )
    serve.add_argument(
        "--max-num-batched-tokens", type=int, default=None,
        help="tokens per engine step, decodes and prompt chunks together",
    )
    serve.add_argument(
        "--state-dtype", default=None, choices=["float32", "bfloat16"],
        help="dtype of the per-request Fenwick state (default float32; bfloat16 halves its memory and bytes)",
    )
    serve.add_argument(
        "--memory-fraction", type=float, default=None,
        help="fraction of free GPU memory (or available RAM) the state pool may take (default 0.9)",
    )
    serve.add_argument("--seed", type=int, default=None, help="sampling seed of requests without their own")
    serve.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    serve.add_argument(
        "--no-overlap-decode", action="store_true",
        help="wait for each step's tokens before queueing the next decode step (default: queue it "
             "ahead with CUDA graphs)",
    )
    serve.add_argument(
        "--prefill-graphs", type=int, default=None,
        help="opt-in: prompt steps replayed from CUDA graphs, at most this many kept, one per step shape "
             "(prompt lengths and start positions) seen twice (default 0: prompt steps eager)",
    )
    serve.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
        help="keep request states by token prefix and restore them into new requests that share it, "
             "prefilling only the rest (default: on)",
    )
    serve.add_argument(
        "--prefix-cache-interval", type=int, default=None,
        help="also snapshot long prompts every this many tokens (default 2048; 0: only at prompt ends, "
             "request ends and branch points)",
    )
    serve.add_argument(
        "--prefix-cache-gib", type=float, default=None,
        help="GPU memory for prefix-cache snapshots, taken only from what the state slots leave "
             "(default 4; 64 MiB on the CPU)",
    )
    serve.add_argument(
        "--prefix-cache-host-gib", type=float, default=None,
        help="pinned host memory for snapshots evicted from the GPU (default 4; 0 on the CPU)",
    )
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    serve.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="larger bodies get 413")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=60.0,
        help="seconds SIGTERM waits for running requests before cancelling them",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def resolve_model_dir(model: Path | None) -> Path:
    """The model directory, or SystemExit with a message saying what to pass."""
    model_dir = (model or DEMO_MODEL).expanduser()
    if (model_dir / "config.json").is_file():
        return model_dir.resolve()
    if model is None:
        raise SystemExit(
            f"fenwick serve: the bundled demo model is not at {DEMO_MODEL}.\n"
            "Pass --model DIR, a model directory holding config.json, model.safetensors and tokenizer.json."
        )
    raise SystemExit(
        f"fenwick serve: {model_dir} is not a model directory (no config.json); pass --model DIR."
    )


def read_generation_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def build_configs(args: argparse.Namespace) -> tuple[Any, ServerConfig]:
    """(EngineConfig, ServerConfig) from the parsed command line; ValueError for bad values."""
    model_dir = resolve_model_dir(args.model)  # before importing torch, so a wrong path fails fast
    from ..engine.config import EngineConfig

    engine_kwargs: dict[str, Any] = {"device": args.device, "dtype": args.dtype}
    if args.max_num_seqs is not None:
        engine_kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_model_len is not None:
        engine_kwargs["max_model_len"] = args.max_model_len
    if args.max_waiting is not None:
        engine_kwargs["max_waiting"] = args.max_waiting
    for key in ("max_num_batched_tokens", "state_dtype", "memory_fraction", "seed", "prefill_graphs"):
        if getattr(args, key) is not None:
            engine_kwargs[key] = getattr(args, key)
    engine_kwargs["enforce_eager"] = args.enforce_eager
    for key in ("enable_prefix_caching", "prefix_cache_interval"):
        if getattr(args, key) is not None:
            engine_kwargs[key] = getattr(args, key)
    for tier in ("", "host_"):
        gib = getattr(args, f"prefix_cache_{tier}gib")
        if gib is not None:
            engine_kwargs[f"prefix_cache_{tier}bytes"] = int(gib * (1 << 30))
    if args.no_overlap_decode:
        engine_kwargs["overlap_decode"] = False
    name = args.served_model_name or model_dir.name
    engine_config = EngineConfig(model=str(model_dir), served_model_name=name, **engine_kwargs)
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        served_model_name=name,
        max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level,
        sampling_defaults=sampling_defaults_from_generation_config(read_generation_config(model_dir)),
    )
    return engine_config, server_config


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        engine_config, server_config = build_configs(args)
    except ValueError as exc:
        raise SystemExit(f"fenwick serve: {exc}") from None

    import uvicorn

    from ..engine.async_llm import AsyncLLM
    from ..engine.startup import freeze_heap
    from .app import create_app

    engine = AsyncLLM(engine_config)
    freeze_heap()  # the loaded model and engine out of the garbage collector's sight
    app = create_app(engine, server_config)
    uvicorn_config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=server_config.log_level,
        lifespan="on",
        timeout_graceful_shutdown=server_config.shutdown_timeout,
    )
    uvicorn.Server(uvicorn_config).run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
