"""`fenwick serve`: configuration is read here, once, and passed down frozen."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..models import demo_model_dir
from .config import (
    ServerConfig,
    default_max_tokens_from_generation_config,
    sampling_defaults_from_generation_config,
)

DEMO_MODEL = demo_model_dir()
logger = logging.getLogger("fenwick.server")


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
    auth = serve.add_mutually_exclusive_group()
    auth.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize (default: "
        "$FENWICK_API_KEY when set; an empty key is an error, never 'no authentication')",
    )
    auth.add_argument(
        "--no-api-key", action="store_true", help="serve without authentication (an error if a key is set)"
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
    serve.add_argument(
        "--cpu-threads", type=int, default=None,
        help="torch threads of the engine core (default: torch's count, capped by the CPUs the process may "
             "use: its affinity and its container's CPU quota)",
    )
    limits = ServerConfig()
    serve.add_argument(
        "--max-body-bytes", type=int, default=limits.max_body_bytes, help="larger bodies get 413"
    )
    serve.add_argument(
        "--max-header-bytes", type=int, default=limits.max_header_bytes,
        help="request line and headers; larger get 400 and the connection closes",
    )
    serve.add_argument(
        "--header-timeout", type=float, default=limits.header_timeout,
        help="seconds a client has to send its request line and headers before the connection closes",
    )
    serve.add_argument(
        "--max-connections", type=int, default=limits.max_connections,
        help="open connections and requests at once; more get 503",
    )
    serve.add_argument(
        "--max-prompts", type=int, default=limits.max_prompts,
        help="prompts in one completions request (also at most --max-waiting + --max-num-seqs)",
    )
    serve.add_argument("--max-n", type=int, default=limits.max_n, help="completions per prompt (n)")
    serve.add_argument(
        "--max-logprobs", type=int, default=limits.max_logprobs, help="logprobs / top_logprobs (at most 20)"
    )
    serve.add_argument(
        "--max-stop", type=int, default=limits.max_stop, help="stop strings, and stop token ids, per request"
    )
    serve.add_argument(
        "--max-stop-chars", type=int, default=limits.max_stop_chars, help="characters of one stop string"
    )
    serve.add_argument(
        "--default-max-tokens", type=int, default=None,
        help="max_tokens of a request that sets none (default: generation_config.json's max_new_tokens, "
        "else up to the context)",
    )
    serve.add_argument(
        "--trust-request-chat-template", action="store_true",
        help="accept a request's own chat_template (rendered in a separate process with a time and size "
        "budget); refused by default",
    )
    serve.add_argument(
        "--chat-template-timeout", type=float, default=limits.chat_template_timeout,
        help="seconds a request's chat template may render",
    )
    serve.add_argument(
        "--max-prompt-chars", type=int, default=limits.max_prompt_chars,
        help="characters a chat template may render",
    )
    serve.add_argument(
        "--api-server-count", type=int, default=limits.api_server_count,
        help="API server processes sharing the port (HTTP, tokenizing, detokenizing, SSE); the engine core "
        "runs in a process of its own",
    )
    serve.add_argument(
        "--stream-interval", type=int, default=limits.stream_interval,
        help="send streamed deltas every this many tokens (the first and the last at once)",
    )
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


def resolve_api_key(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    """The API key, failing closed: a key given (flag or FENWICK_API_KEY) must be non-empty after
    trimming; no key at all, or --no-api-key, serves without authentication."""
    from_env = env.get("FENWICK_API_KEY")
    if args.no_api_key:
        if from_env is not None:
            raise ValueError("--no-api-key, but FENWICK_API_KEY is set: unset one of them")
        return None
    key = args.api_key if args.api_key is not None else from_env
    if key is None:
        return None
    where = "--api-key" if args.api_key is not None else "FENWICK_API_KEY"
    if not key.strip():
        raise ValueError(f"{where} is empty; pass a key, or --no-api-key to serve without authentication")
    return key.strip()


def build_configs(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> tuple[Any, ServerConfig]:
    """(EngineConfig, ServerConfig) from the parsed command line and the environment (FENWICK_API_KEY);
    ValueError for bad values."""
    model_dir = resolve_model_dir(args.model)  # before importing torch, so a wrong path fails fast
    from ..engine.config import EngineConfig

    engine_kwargs: dict[str, Any] = {"device": args.device, "dtype": args.dtype}
    if args.max_num_seqs is not None:
        engine_kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_model_len is not None:
        engine_kwargs["max_model_len"] = args.max_model_len
    if args.max_waiting is not None:
        engine_kwargs["max_waiting"] = args.max_waiting
    for key in ("max_num_batched_tokens", "state_dtype", "memory_fraction", "seed", "cpu_threads"):
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
    api_key = resolve_api_key(args, {} if env is None else env)
    engine_config = EngineConfig(model=str(model_dir), served_model_name=name, **engine_kwargs)
    generation_config = read_generation_config(model_dir)
    default_max_tokens = args.default_max_tokens
    if default_max_tokens is None:
        default_max_tokens = default_max_tokens_from_generation_config(generation_config)
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=api_key,
        served_model_name=name,
        max_body_bytes=args.max_body_bytes,
        max_header_bytes=args.max_header_bytes,
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level,
        sampling_defaults=sampling_defaults_from_generation_config(generation_config),
        default_max_tokens=default_max_tokens,
        max_prompts=args.max_prompts,
        max_n=args.max_n,
        max_logprobs=args.max_logprobs,
        max_stop=args.max_stop,
        max_stop_chars=args.max_stop_chars,
        trust_request_chat_template=args.trust_request_chat_template,
        chat_template_timeout=args.chat_template_timeout,
        max_prompt_chars=args.max_prompt_chars,
        api_server_count=args.api_server_count,
        stream_interval=args.stream_interval,
    )
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without authentication (no --api-key, no FENWICK_API_KEY)", args.host)
    return engine_config, server_config


def serve(args: argparse.Namespace) -> int:
    from ..engine.startup import configure_logging

    configure_logging(args.log_level)
    try:
        engine_config, server_config = build_configs(args, os.environ)
    except ValueError as exc:
        raise SystemExit(f"fenwick serve: {exc}") from None

    from .launcher import launch

    return launch(engine_config, server_config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
