"""Timing helpers shared by the GPU tests: CUDA-event medians and printing past pytest's capture.

Imported by the test modules of this folder as ``from gpu_timing import ...`` (pytest's default
``prepend`` import mode puts this folder, which has no ``__init__.py``, on ``sys.path``). CuPy
is imported only inside the functions: the modules are collected, and their tests skipped, on
machines without it.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


def median_ms(function: Callable[[], Any], repeats: int = 50, warmup: int = 5) -> float:
    """Median time of ``function()`` in ms between CUDA events on the current stream, after
    ``warmup`` untimed calls (any synchronisation inside ``function`` makes this its latency,
    host overhead included)."""
    import cupy

    for _ in range(warmup):
        function()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        function()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def report(capsys: Any, message: str, tag: str = "gpu timing") -> None:
    """Print ``message`` as ``[tag] message`` into the test log even when pytest captures output."""
    with capsys.disabled():
        print(f"\n[{tag}] {message}")
