"""The server's half of the configuration: built once at the CLI edge, frozen, passed down."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from ..engine.sampling_params import MAX_LOGPROBS

# Sampling fields a model's generation_config.json may default (OpenAI's names where they differ).
DEFAULTABLE_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


@dataclass(frozen=True)
class ServerConfig:
    """Every bound a request meets at the edge; docs/serving-limits.md lists them with their flags."""

    host: str = "127.0.0.1"  # interface to bind
    port: int = 8000
    api_key: str | None = None  # when set, /v1/*, /tokenize and /detokenize need "Authorization: Bearer KEY"
    served_model_name: str | None = None  # None: the engine's served_model_name
    max_body_bytes: int = 8 * 1024 * 1024  # larger request bodies get 413
    max_header_bytes: int = 16 * 1024  # request line and headers; larger get 431 and the connection closes
    header_timeout: float = 10.0  # seconds a client has to send its request line and headers
    max_connections: int = 2048  # open connections and requests at once; more get 503
    shutdown_timeout: float = 60.0  # seconds SIGTERM waits for in-flight requests before cancelling them
    log_level: str = "info"
    sampling_defaults: Mapping[str, Any] = field(default_factory=dict)  # from generation_config.json
    default_max_tokens: int | None = None  # max_tokens of a request that sets none (None: up to the context)
    max_prompts: int = 64  # prompts in one completions request
    max_n: int = 16  # completions per prompt (also at most the engine's slots)
    max_logprobs: int = 20  # logprobs / top_logprobs
    max_stop: int = 16  # stop strings, and stop token ids, per request
    max_stop_chars: int = 256  # characters of one stop string
    trust_request_chat_template: bool = False  # allow a request's own chat_template (rendered in a sandbox)
    chat_template_timeout: float = 2.0  # seconds a request's chat template may render
    max_prompt_chars: int = 1 << 20  # characters a chat template may render
    api_server_count: int = 1  # API server processes sharing the port (fenwick serve; docs/serving.md)
    stream_interval: int = 1  # streamed deltas every this many tokens (and the first and last)
    metrics_dir: str | None = None  # prometheus_client's multiprocess directory (set by server/launcher.py)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None:
            if not self.api_key.strip():
                raise ValueError("api_key must be non-empty when given (--no-api-key: no authentication)")
            object.__setattr__(self, "api_key", self.api_key.strip())
        positive = ("max_header_bytes", "max_connections", "max_prompts", "max_n", "max_stop_chars",
                    "max_prompt_chars", "header_timeout", "chat_template_timeout", "api_server_count",
                    "stream_interval")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS or self.max_stop < 0:
            raise ValueError(f"max_logprobs must be in [0, {MAX_LOGPROBS}] and max_stop non-negative")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")
        if self.served_model_name is not None and not self.served_model_name:
            raise ValueError("served_model_name must be non-empty when given")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be non-negative")
        unknown = set(self.sampling_defaults) - set(DEFAULTABLE_SAMPLING_FIELDS)
        if unknown:
            raise ValueError(f"sampling_defaults has unknown fields: {sorted(unknown)}")
        object.__setattr__(self, "sampling_defaults", MappingProxyType(dict(self.sampling_defaults)))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled for the API server processes (spawn): a MappingProxyType does not pickle."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        kwargs["sampling_defaults"] = dict(self.sampling_defaults)
        return (_server_config, (kwargs,))


def _server_config(kwargs: dict[str, Any]) -> ServerConfig:
    return ServerConfig(**kwargs)


def default_max_tokens_from_generation_config(generation_config: Mapping[str, Any]) -> int | None:
    """Hugging Face's max_new_tokens, the cap of a request that sets no max_tokens (None when absent)."""
    value = generation_config.get("max_new_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def sampling_defaults_from_generation_config(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the sampling fields of a generation_config.json that the server can default."""
    defaults = {
        k: v for k, v in generation_config.items() if k in DEFAULTABLE_SAMPLING_FIELDS and v is not None
    }
    if generation_config.get("do_sample") is False:  # Hugging Face's switch for greedy decoding
        defaults["temperature"] = 0.0
    return defaults
