"""GPU tests: marked ``gpu`` and skipped (with the reason) where CuPy sees no CUDA device."""
from __future__ import annotations

import pytest

from bevfusion_ros.runtime.array_module import gpu_available

collect_ignore_glob: list[str] = []


def pytest_collection_modifyitems(config, items):
    skip = None if gpu_available() else pytest.mark.skip(reason="needs CuPy and an NVIDIA GPU")
    for item in items:
        if "test/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def frame(example_data_dir):
    """The CUDA-BEVFusion example frame."""
    from bevfusion_ros.io import load_example_data
    return load_example_data(example_data_dir)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny fp16 model set with seeded random weights (seed 11)."""
    from bevfusion_ros.model.export import export_model_set
    from bevfusion_ros.model.presets import TINY
    return export_model_set(TINY, "fp16", tmp_path_factory.mktemp("tiny"), seed=11).out_dir
