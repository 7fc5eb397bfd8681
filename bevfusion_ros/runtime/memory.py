"""Process-wide allocator setting for frame-sized buffers (ROS-free).

glibc's malloc serves every block above its mmap threshold (128 KiB, growing on its own only up
to what was last freed) with a fresh ``mmap`` and returns it with ``munmap`` when freed. A node
that receives, copies and frees megabyte-sized images and clouds at sensor rate then page-faults
on every byte of every such buffer, and page faults are slow (very slow in sandboxed kernels):
the 1.8 MB PointCloud2 of the example frame took 4.5 ms from publisher to callback on the
development machine, 1.35 ms with :func:`keep_large_buffers` in both processes.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3        # glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 32 * 2**20      # glibc's maximum: a stack of six 1600x900 images fits below
TRIM_THRESHOLD_BYTES = 512 * 2**20     # keep up to this much freed memory for the next frame
TOP_PAD_BYTES = 64 * 2**20             # grow the heap in steps of this much


def keep_large_buffers() -> bool:
    """Make glibc keep blocks up to 32 MiB on the heap and reuse them instead of mapping and
    unmapping each one; False (nothing changed) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (M_TOP_PAD, TOP_PAD_BYTES)))
