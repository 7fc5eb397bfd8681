"""BEV pooling: depth-weighted camera features summed into the camera BEV grid (spec 3.5).

For every interval ``(start, end, offset)`` of a :class:`CameraGeometry` and channel c::

    bev[c, offset] = sum over t in [start, end) of  F[cam(n), pix(n), c] * W_flat[n],   n = indices[t]

with ``cam(n) = n // (D*fH*fW)`` and ``pix(n) = n % (fH*fW)``. Products and sums are float32.
The CUDA kernel accumulates each interval sequentially with fused multiply-adds; here the
products are rounded first and ``np.add.reduceat`` sums an interval with NumPy's pairwise
float32 summation, so results agree to float32 rounding, not bit for bit. Cells without an
interval stay 0.

The NumPy path walks the sorted points in chunks that end on interval boundaries. Per chunk
it gathers the features channel-major (``[C, chunk]``, from the transposed feature map, so
every gather and sum runs along contiguous memory), scales them by the depth weights and sums
each interval with ``np.add.reduceat``; the chunk stays in cache and nothing of size
``keep_count x C`` is ever materialised.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from bevfusion_ros.camera.geometry import CameraGeometry
from bevfusion_ros.runtime.array_module import is_cupy

CHUNK_POINTS = 8192      # sorted points per step: 8192 x C float32 (2.6 MB at C = 80)


def check_inputs(camera_feature: Any, depth_weights: Any, geometry: CameraGeometry) -> None:
    """Raise ``ValueError`` unless the shapes fit ``geometry.frustum_shape`` (NumPy or CuPy arrays)."""
    cameras, depth_bins, height, width = geometry.frustum_shape
    if depth_weights.shape != geometry.frustum_shape:
        raise ValueError(f"depth_weights must be [N, D, fH, fW] = {list(geometry.frustum_shape)}, "
                         f"got {list(depth_weights.shape)}")
    if camera_feature.ndim != 4 or camera_feature.shape[:3] != (cameras, height, width):
        raise ValueError(f"camera_feature must be NHWC [{cameras}, {height}, {width}, C], "
                         f"got {list(camera_feature.shape)}")


def feature_rows(indices: np.ndarray, frustum_shape: tuple[int, int, int, int]) -> np.ndarray:
    """Row of ``camera_feature.reshape(N * fH * fW, C)`` that frustum point ``indices`` reads."""
    _, depth_bins, height, width = frustum_shape
    pixels = height * width
    return indices // (depth_bins * pixels) * pixels + indices % pixels


def _chunk_bounds(starts: np.ndarray, covered: int) -> np.ndarray:
    """Interval numbers at which chunks of about CHUNK_POINTS sorted points begin (plus the end)."""
    targets = np.arange(0, covered, CHUNK_POINTS)
    return np.unique(np.append(np.searchsorted(starts, targets, side="right") - 1, len(starts)))


def bev_pool(camera_feature: np.ndarray, depth_weights: np.ndarray, geometry: CameraGeometry,
             out: Any = None) -> np.ndarray:
    """Camera BEV float32 ``[1, C, X, Y]`` (rows = x).

    camera_feature: ``[N, fH, fW, C]`` NHWC (any float dtype, used as float32);
    depth_weights:  ``[N, D, fH, fW]`` (any float dtype, used as float32);
    geometry:       from :func:`compute_geometry` for the same calibration and config.

    With CuPy features or weights, or a geometry from :meth:`CameraGeometry.to_device`, it
    pools on the GPU (see :mod:`bevfusion_ros.camera.bevpool_cuda`) and returns CuPy, written
    into ``out`` when given (CuPy float32 or float16 ``[1, C, X, Y]``; CuPy only).
    """
    if any(is_cupy(array) for array in (camera_feature, depth_weights, geometry.indices)):
        from bevfusion_ros.camera.bevpool_cuda import bev_pool_cuda
        return bev_pool_cuda(camera_feature, depth_weights, geometry, out)
    if out is not None:
        raise ValueError("out= is supported for CuPy inputs only")
    check_inputs(camera_feature, depth_weights, geometry)
    channels = camera_feature.shape[3]
    features = np.ascontiguousarray(camera_feature.reshape(-1, channels).T, dtype=np.float32)   # [C, N*fH*fW]
    weights = np.asarray(depth_weights, dtype=np.float32).reshape(-1)
    nx, ny = geometry.bev_size
    bev = np.zeros((channels, nx * ny), dtype=np.float32)
    # Only the last interval can be empty ("cuda" end of a one-point cell); reduceat cannot skip it.
    intervals = geometry.intervals[geometry.intervals[:, 1] > geometry.intervals[:, 0]]
    if len(intervals):
        starts, covered = intervals[:, 0].astype(np.int64), int(intervals[-1, 1])
        bounds = _chunk_bounds(starts, covered)
        for first, stop in zip(bounds[:-1], bounds[1:]):
            begin = starts[first]
            end = starts[stop] if stop < len(starts) else covered
            ids = geometry.indices[begin:end]
            products = np.take(features, feature_rows(ids, geometry.frustum_shape), axis=1)
            products *= weights[ids]
            bev[:, intervals[first:stop, 2]] = np.add.reduceat(products, starts[first:stop] - begin, axis=1)
    return bev.reshape(1, channels, nx, ny)
