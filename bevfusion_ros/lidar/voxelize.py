"""Hard voxelization of a lidar point cloud (spec 5.1), NumPy or CuPy, no torch.

Semantics (identical to :func:`bevfusion_ros.model.reference.voxelize`, deterministic):

- a point is kept when ``min <= p < max`` on x, y, z (half-open; NaN and inf fail the test) and
  all its channels are finite (a NaN intensity would poison its voxel's mean);
- voxel index = floor((p - min) / size) per axis, in **float32 true division with float32
  constants** (float64 or a reciprocal multiply moves points that sit exactly on voxel edges:
  44,212 instead of 44,224 voxels on the example frame, spec "Read first");
- voxels are numbered by the first point that reaches them (input order); the first
  ``max_voxels`` are kept, later voxels are dropped with all their points;
- feature = mean over all channels of the first ``max_points_per_voxel`` points of the voxel
  (input order), summed in float32 point by point in input order, divided in float32, stored fp16.

CUDA-BEVFusion's kernel numbers voxels and orders points by atomics (non-deterministic); this
module follows mit-han-lab's deterministic hard voxelization instead (spec 5.1 step 3).

Runs where the points live. This module is the reference, written with NumPy/CuPy array ops (sorts,
scans, gathers and IEEE float32 element-wise arithmetic, no atomics); :func:`voxelize` hands CuPy
points to :func:`bevfusion_ros.lidar.voxelize_cuda.voxelize_cuda` (three RawKernels and one sort
instead of about 40 CuPy array ops, several host synchronisations and the
[M, max_points_per_voxel, C] buffer), which gives bit-identical results.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bevfusion_ros.config import VoxelizationConfig
from bevfusion_ros.runtime.array_module import get_array_module, is_cupy, to_numpy

Array = Any                      # numpy.ndarray or cupy.ndarray


@dataclass(frozen=True, eq=False)
class Voxels:
    """Voxelizer output for one frame (M voxels, C point channels), arrays NumPy or CuPy like the points.

    features float16 [M, C]: mean of the points used; coords int32 [M, 4] = (0, ix, iy, iz);
    point_count int32 [M]: points used per voxel (1 .. max_points_per_voxel).
    Dropped points: ``points_out_of_range`` (outside the range, or a non-finite channel),
    ``points_over_capacity`` (beyond max_points_per_voxel in a kept voxel) and the points of
    the ``voxels_over_capacity`` occupied voxels beyond max_voxels (``points_in_dropped_voxels``).
    """

    features: Array
    coords: Array
    point_count: Array
    points_out_of_range: int
    points_over_capacity: int
    voxels_over_capacity: int
    points_in_dropped_voxels: int

    @property
    def num_voxels(self) -> int:
        return int(self.coords.shape[0])


def voxel_indices(points: Array, config: VoxelizationConfig) -> tuple[Array, Array]:
    """Points float32 [N, C] -> (inside bool [N], voxel index int64 [N_inside, 3] (ix, iy, iz)).

    ``inside``: every channel finite, min <= p < max on x, y, z and the index on ``config.grid_size``.
    """
    xp = get_array_module(points)
    low, high, size = (xp.asarray(values, dtype=np.float32) for values in
                       (config.point_range_min, config.point_range_max, config.voxel_size))
    xyz = points[:, :3]
    in_range = xp.all((xyz >= low) & (xyz < high), axis=1) & xp.all(xp.isfinite(points), axis=1)
    safe = xp.where(in_range[:, None], xyz, low)      # rows out of range -> index 0, never inf/NaN
    index = xp.floor((safe - low) / size).astype(np.int64)       # float32 throughout
    inside = in_range & xp.all(index < xp.asarray(config.grid_size), axis=1)  # >= 0 since p >= min
    return inside, index[inside]


@dataclass(frozen=True, eq=False)
class _VoxelGroups:
    """Points grouped by voxel: ``voxel`` int64 [N] (0-based, by first appearance), ``slot`` int64 [N]
    (earlier points of the same voxel), ``first_point`` int64 [V] (input row of each voxel's first
    point), ``size`` int64 [V] (points per voxel)."""

    voxel: Array
    slot: Array
    first_point: Array
    size: Array


def _group_by_voxel(keys: Array) -> _VoxelGroups:
    """One sort of the voxel keys int64 [N] gives voxel ids, arrival slots and first points.

    The sort key is key * N + input row: unique, so any sort (NumPy's or CuPy's) orders the points
    by voxel, then by input order.
    """
    xp = get_array_module(keys)
    count = keys.shape[0]
    stride = max(count, 1)
    packed = xp.sort(keys * stride + xp.arange(count, dtype=np.int64))
    order, sorted_keys = packed % stride, packed // stride
    is_start = xp.ones(count, dtype=bool)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    starts = xp.flatnonzero(is_start)
    size = xp.diff(xp.concatenate((starts, xp.full(1, count, dtype=starts.dtype))))
    group_of_sorted = xp.cumsum(is_start, dtype=np.int64) - 1
    first_point = order[starts]                        # smallest input row of the voxel
    appearance = xp.argsort(first_point)               # voxel groups by first appearance (unique)
    rank = xp.empty_like(appearance)
    rank[appearance] = xp.arange(appearance.shape[0])
    voxel = xp.empty_like(order)
    voxel[order] = rank[group_of_sorted]
    slot = xp.empty_like(order)
    slot[order] = xp.arange(count) - starts[group_of_sorted]
    return _VoxelGroups(voxel, slot, first_point[appearance], size[appearance])


def _voxel_means(points: Array, groups: _VoxelGroups, num_voxels: int, point_count: Array,
                 capacity: int) -> Array:
    """float16 [M, C] means of the first ``capacity`` points of the first ``num_voxels`` voxels.

    mmdet3d's hard-voxel layout: a float32 [M, capacity, C] buffer (zeros in empty slots) summed
    slot by slot in input order, then divided by ``point_count`` int32 [M] in float32. For fp16
    input (CUDA-BEVFusion's point type) the float32 sums are exact anyway; for float32 input
    the order decides the last bit.
    """
    xp = get_array_module(points)
    channels = points.shape[1]
    used = (groups.voxel < num_voxels) & (groups.slot < capacity)
    spare = num_voxels * capacity                      # one extra row takes every unused point
    slots = xp.zeros((spare + 1, channels), dtype=np.float32)
    slots[xp.where(used, groups.voxel * capacity + groups.slot, spare)] = points
    slots = slots[:spare].reshape(num_voxels, capacity, channels)
    sums = slots[:, 0].copy()
    for slot in range(1, capacity):                    # sequential float32 sum, input order
        sums += slots[:, slot]
    return (sums / point_count[:, None].astype(np.float32)).astype(np.float16)


def voxelize(points: Array, config: VoxelizationConfig) -> Voxels:
    """Points float32 [N, C] (C >= 3, x y z first; fp16 is widened) -> :class:`Voxels`.

    NumPy or CuPy points; the voxels live in the same place. Work is O(N log N) (one sort); NumPy
    allocates a [M, max_points_per_voxel, C] float32 buffer, CuPy points go to the CUDA kernels
    of :mod:`bevfusion_ros.lidar.voxelize_cuda`.
    """
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be [N, C] with C >= 3 (x, y, z first), got shape {points.shape}")
    if is_cupy(points):
        from bevfusion_ros.lidar.voxelize_cuda import voxelize_cuda
        return voxelize_cuda(points, config)
    xp = get_array_module(points)
    points = points.astype(np.float32, copy=False)
    inside, index = voxel_indices(points, config)
    points = points[inside]
    nx, ny, _ = config.grid_size
    groups = _group_by_voxel((index[:, 2] * ny + index[:, 1]) * nx + index[:, 0])
    num_voxels = min(int(groups.first_point.shape[0]), config.max_voxels)
    capacity = config.max_points_per_voxel
    point_count = xp.minimum(groups.size[:num_voxels], capacity).astype(np.int32)
    coords = xp.zeros((num_voxels, 4), dtype=np.int32)
    coords[:, 1:] = index[groups.first_point[:num_voxels]].astype(np.int32)
    kept_voxel_points, used_points = (int(total) for total in to_numpy(
        xp.stack((groups.size[:num_voxels].sum(), point_count.sum()))))
    return Voxels(
        features=_voxel_means(points, groups, num_voxels, point_count, capacity),
        coords=coords,
        point_count=point_count,
        points_out_of_range=int(inside.shape[0] - points.shape[0]),
        points_over_capacity=kept_voxel_points - used_points,
        voxels_over_capacity=int(groups.first_point.shape[0]) - num_voxels,
        points_in_dropped_voxels=int(points.shape[0]) - kept_voxel_points,
    )
