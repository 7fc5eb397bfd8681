"""Shared fixtures: the example data in ../shared (tests using it skip when it is absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "nuscenes-sample"
EXAMPLE_DATA = SHARED_DATA / "cuda-bevfusion-example"


@pytest.fixture(scope="session")
def example_data_dir() -> Path:
    """CUDA-BEVFusion example-data folder; skips when ../shared is not beside the clone."""
    if not EXAMPLE_DATA.is_dir():
        pytest.skip(f"example data not found at {EXAMPLE_DATA} (../shared is absent)")
    return EXAMPLE_DATA
