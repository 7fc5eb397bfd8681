"""GPU tests: marked ``gpu`` and skipped (with the reason) where CuPy sees no CUDA device."""
from __future__ import annotations

import pytest

from bevfusion_ros.array_module import gpu_available

collect_ignore_glob: list[str] = []


def pytest_collection_modifyitems(config, items):
    skip = None if gpu_available() else pytest.mark.skip(reason="needs CuPy and an NVIDIA GPU")
    for item in items:
        if "test/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)
