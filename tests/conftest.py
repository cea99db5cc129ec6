"""Shared test configuration: GPU tests run only where CUDA is present."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `python -m pytest` from the checkout puts the repository root on sys.path, where our top-level
# `kernels/` folder would shadow Hugging Face's `kernels` (which transformers imports). Fenwick is
# imported as installed (fenwick_llm.*), so the root comes off the path before any test module loads.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Shared server fixtures: a real `fenwick serve` process (server, client and deployment tests), and an
# in-process app over a fake engine (the server app tests).
pytest_plugins = ("server_utils", "fake_engine")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run faster on one intra-op thread than on two contending ones (2-core CI)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (gpu marker); run on the H200")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ---- tiny model directories (tests/tiny.py), built once per session ----------------------------------------

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random model directory with adaptive (mlp) decay."""
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_mlp"), lambda_mode="mlp")


@pytest.fixture(scope="session")
def tiny_model_dir_linear(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random model directory with FLA's linear λ (the L parameter)."""
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_linear"), lambda_mode="linear")
