"""create_app(engine, config): the FastAPI application, its routes and its lifespan. No module state."""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .config import ServerConfig
from .errors import APIError, bad_request, install_error_handlers
from .metrics import Metrics
from .middleware import EdgeMiddleware
from .openapi import install_openapi
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from .request_stream import EngineClient
from .serving_chat import ChatServing
from .serving_completions import CompletionServing
from .shutdown import Shutdown
from .structured import Constraints

ROUTES = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/tokenize",
        "/detokenize",
        "/version",
    }
)


def fenwick_version() -> str:
    try:
        return importlib.metadata.version("fenwick")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def max_model_len_of(engine: EngineClient) -> int:
    configured = getattr(engine.config, "max_model_len", None)
    return int(configured or engine.model_config.max_model_len)


def create_app(engine: EngineClient, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    model_name = config.served_model_name or engine.served_model_name
    metrics = Metrics(config.metrics_dir)
    engine.add_stats_listener(metrics.observe)
    metrics.watch_engine(lambda: engine.is_running)
    shutdown = Shutdown(config.shutdown_timeout)
    constraints = Constraints(engine.grammars, engine.tokenizer.chat_template, metrics)
    completions = CompletionServing(engine, model_name, config, shutdown, constraints)
    chat = ChatServing(engine, model_name, config, shutdown, constraints)
    max_model_len = max_model_len_of(engine)
    version = fenwick_version()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:  # uvicorn has finished the in-flight responses by now; let the engine finish its work too
            await chat.sandbox.close()
            await engine.shutdown(drain=True)

    app = FastAPI(title="Fenwick", version=version, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.metrics = metrics
    app.state.shutdown = shutdown  # the HTTP server calls shutdown.begin() when SIGTERM's drain starts
    install_error_handlers(app)
    app.add_middleware(
        EdgeMiddleware,
        api_key=config.api_key,
        max_body_bytes=config.max_body_bytes,
        count=metrics.count_http,
        known_paths=ROUTES,
    )

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": version}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def card() -> ModelCard:
        return ModelCard(id=model_name, root=model_name, max_model_len=max_model_len)  # no server paths

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[card()]).model_dump())

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> JSONResponse:
        completions.check_model(model)
        return JSONResponse(card().model_dump())

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completions.create(body, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat.create(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        completions.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            tokens = await chat.encode_chat(body.messages, body.add_generation_prompt)
        else:
            assert body.prompt is not None
            tokens = await completions.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return JSONResponse({"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        completions.check_model(body.model)
        if len(body.tokens) > max_model_len or any(t >= completions.vocab_size for t in body.tokens):
            raise APIError(
                400,
                f"at most {max_model_len} token ids, each below the vocabulary size {completions.vocab_size}",
                param="tokens",
                code="invalid_value",
            )
        text = await asyncio.to_thread(engine.tokenizer.decode, body.tokens, skip_special_tokens=False)
        return JSONResponse({"prompt": text})

    install_openapi(app, config)
    return app
