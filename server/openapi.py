"""/openapi.json as the server behaves: the statuses it sends (400, not FastAPI's 422), the error object,
SSE and Prometheus content types, and the operator's bounds (ServerConfig) on the request fields."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ..engine.sampling_params import INT64_MAX, SEED_MAX, SEED_MIN
from .config import ServerConfig
from .protocol import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, ModelCard, ModelList

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_DESCRIPTIONS = {
    400: "Bad parameters, a prompt longer than the context, or a malformed body",
    401: "Missing or wrong API key",
    404: "Unknown model or path",
    413: "Request body larger than the server's limit",
    429: "The waiting queue is full; retry after Retry-After seconds",
    500: "A bug in the server or the engine (never the client's input)",
    503: "The engine has stopped or the server is shutting down",
}
_GENERATE = ("/v1/completions", "/v1/chat/completions")
_PROTECTED = ("/v1/", "/tokenize", "/detokenize")
_RESPONSES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionResponse,
    "/v1/chat/completions": ChatCompletionResponse,
    "/v1/models": ModelList,
    "/v1/models/{model}": ModelCard,
}


def _error(status: int) -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    return {"description": _DESCRIPTIONS[status], "content": content}


def _model_ref(schema: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Add the model (and the models it uses) to components; its $ref."""
    js = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(js.pop("$defs", {}))
    components[model.__name__] = js
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _bound(schema: dict[str, Any], name: str, field: str, **bounds: Any) -> None:
    """Set bounds on a request field (on each of its anyOf branches that they fit)."""
    prop = schema["components"]["schemas"].get(name, {}).get("properties", {}).get(field)
    if prop is None:
        return
    for branch in prop.get("anyOf", [prop]):
        for key, value in bounds.items():
            fits = branch.get("type") == ("array" if key == "maxItems" else "string" if key == "maxLength"
                                          else "integer")
            if fits:
                branch[key] = value


_EXACT = {float(v): v for v in (INT64_MAX, SEED_MAX, SEED_MIN)}  # the generator rounds them to floats


def _exact_ints(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("minimum", "maximum") and isinstance(value, float) and value in _EXACT:
                node[key] = _EXACT[value]
            else:
                _exact_ints(value)
    elif isinstance(node, list):
        for item in node:
            _exact_ints(item)


def _patch(schema: dict[str, Any], config: ServerConfig) -> None:
    _exact_ints(schema)
    schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            statuses = [400, 404, 413, 500] if method == "post" else [404, 500]
            if path in _GENERATE:
                statuses += [429, 503]
            if path == "/health":
                statuses = [503]
            if config.api_key is not None and path.startswith(_PROTECTED):
                statuses.append(401)
                op["security"] = [{"bearer": []}]
            for status in statuses:
                responses[str(status)] = _error(status)
            model = _RESPONSES.get(path)
            ok = responses.setdefault("200", {"description": "Successful Response"})
            if model is not None:
                ok["content"] = {"application/json": {"schema": _model_ref(schema, model)}}
            if path in _GENERATE:
                chunk = ChatCompletionChunk if "chat" in path else CompletionResponse
                ok["content"]["text/event-stream"] = {
                    "schema": {"type": "string", "description": f"with stream: true, server-sent events: "
                               f"'data: <{chunk.__name__} JSON>' each, ending 'data: [DONE]'"}}
                _model_ref(schema, chunk)
            if path == "/metrics":
                ok["content"] = {"text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}}
    if config.api_key is not None:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        _bound(schema, name, "n", maximum=config.max_n)
        _bound(schema, name, "stop", maxItems=config.max_stop, maxLength=config.max_stop_chars)
        _bound(schema, name, "stop_token_ids", maxItems=config.max_stop)
    _bound(schema, "CompletionRequest", "prompt", maxItems=config.max_prompts)
    _bound(schema, "CompletionRequest", "logprobs", maximum=config.max_logprobs)
    _bound(schema, "ChatCompletionRequest", "top_logprobs", maximum=config.max_logprobs)


def install_openapi(app: FastAPI, config: ServerConfig) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _patch(schema, config)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
