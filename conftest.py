"""Test and benchmark collection for the whole repository."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped where no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
