"""Timing helpers shared by the GPU tests: CUDA-event medians (the package's
:func:`bevfusion_ros.tools.cuda_timing.median_ms`) and printing past pytest's capture.

Imported by the test modules of this folder as ``from gpu_timing import ...`` (pytest's default
``prepend`` import mode puts this folder, which has no ``__init__.py``, on ``sys.path``). CuPy
is imported only inside the functions: the modules are collected, and their tests skipped, on
machines without it.
"""
from __future__ import annotations

from typing import Any

from bevfusion_ros.tools.cuda_timing import median_ms

__all__ = ["median_ms", "report"]


def report(capsys: Any, message: str, tag: str = "gpu timing") -> None:
    """Print ``message`` as ``[tag] message`` into the test log even when pytest captures output."""
    with capsys.disabled():
        print(f"\n[{tag}] {message}")
