"""NumPy/CuPy dispatch: every op takes arrays of either kind and runs where they live.

CuPy is optional; it is imported only when installed, and ``is_cupy`` never imports it
unless the array could be one.
"""
from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import numpy as np

CUPY_INSTALLED = importlib.util.find_spec("cupy") is not None


def is_cupy(array: Any) -> bool:
    """True for a ``cupy.ndarray`` (checked by module name, so CuPy is not imported here)."""
    return type(array).__module__.startswith("cupy")


def get_array_module(*arrays: Any) -> ModuleType:
    """``cupy`` if any argument is a CuPy array, else ``numpy``."""
    if any(is_cupy(array) for array in arrays):
        import cupy
        return cupy
    return np


def to_numpy(array: Any) -> np.ndarray:
    """Host copy of a NumPy or CuPy array (no copy for NumPy)."""
    return array.get() if is_cupy(array) else np.asarray(array)


def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    if not CUPY_INSTALLED:
        return False
    import cupy
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except cupy.cuda.runtime.CUDARuntimeError:
        return False
