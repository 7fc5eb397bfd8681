"""Shared fixtures: the example data in ../shared (tests using it skip when it is absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "nuscenes-sample"
# BEVFUSION_EXAMPLE_DATA points elsewhere, e.g. on the GPU machine, where ../shared does not travel.
EXAMPLE_DATA = Path(os.environ.get("BEVFUSION_EXAMPLE_DATA", SHARED_DATA / "cuda-bevfusion-example"))


@pytest.fixture(scope="session")
def example_data_dir() -> Path:
    """CUDA-BEVFusion example-data folder; skips when ../shared is not beside the clone."""
    if not EXAMPLE_DATA.is_dir():
        pytest.skip(f"example data not found at {EXAMPLE_DATA} (../shared is absent)")
    return EXAMPLE_DATA
