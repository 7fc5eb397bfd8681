"""CUDA-event timing of a callable, shared by the GPU tests and the benchmark scripts.

CuPy is imported inside the function: this module imports on machines without it.
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
