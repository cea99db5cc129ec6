"""Fenwick: a serving engine for log-linear attention language models with adaptive memory decay.

The repository's top-level folders install under this root: ``engine/`` as ``fenwick_llm.engine``,
``kernels/`` as ``fenwick_llm.kernels``, ``server/`` as ``fenwick_llm.server``, ``tools/`` as
``fenwick_llm.tools`` and the bundled demo model as ``fenwick_llm.models``. The offline API reads as
vLLM's: ``from fenwick_llm import LLM, SamplingParams``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "engine.llm",
    "AsyncLLM": "engine.async_llm",
    "EngineConfig": "engine.config",
    "SamplingParams": "engine.sampling_params",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "load_model": "engine.loader",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    """Import on first use: ``import fenwick_llm`` stays light (no torch until an export is asked for)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
