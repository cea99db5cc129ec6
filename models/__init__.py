"""The bundled demo model, installed with the package as data (``fenwick_llm.models``)."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_NAME = "fenwick-shakespeare"


def demo_model_dir() -> Path:
    """Where the demo model lies in this installation (a checkout, an editable install or a wheel)."""
    return Path(__file__).resolve().parent / DEMO_MODEL_NAME
