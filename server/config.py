"""The server's half of the configuration: built once at the CLI edge, frozen, passed down."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

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
    host: str = "127.0.0.1"  # interface to bind
    port: int = 8000
    api_key: str | None = None  # when set, /v1/*, /tokenize and /detokenize need "Authorization: Bearer KEY"
    served_model_name: str | None = None  # None: the engine's served_model_name
    max_body_bytes: int = 8 * 1024 * 1024  # larger request bodies get 413
    shutdown_timeout: float = 60.0  # seconds SIGTERM waits for in-flight requests before cancelling them
    log_level: str = "info"
    sampling_defaults: Mapping[str, Any] = field(default_factory=dict)  # from generation_config.json

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty when given")
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


def sampling_defaults_from_generation_config(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the sampling fields of a generation_config.json that the server can default."""
    defaults = {
        k: v for k, v in generation_config.items() if k in DEFAULTABLE_SAMPLING_FIELDS and v is not None
    }
    if generation_config.get("do_sample") is False:  # Hugging Face's switch for greedy decoding
        defaults["temperature"] = 0.0
    return defaults
