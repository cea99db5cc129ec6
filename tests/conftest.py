"""Shared test configuration: GPU tests run only where CUDA is present."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (gpu marker); run on the H200")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
