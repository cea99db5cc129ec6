"""Fenwick engine: model, state pool, scheduler, runner, sampler and the offline / online front ends."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": ".llm",
    "AsyncLLM": ".async_llm",
    "EngineConfig": ".config",
    "SamplingParams": ".sampling_params",
    "RequestOutput": ".outputs",
    "CompletionOutput": ".outputs",
    "load_model": ".loader",
    "ModelConfig": ".model_config",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
