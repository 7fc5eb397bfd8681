"""Hard voxelization of a lidar point cloud (spec 5.1), NumPy, no torch.

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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevfusion_ros.config import VoxelizationConfig


@dataclass(frozen=True, eq=False)
class Voxels:
    """Voxelizer output for one frame (M voxels, C point channels).

    features float16 [M, C]: mean of the points used; coords int32 [M, 4] = (0, ix, iy, iz);
    point_count int32 [M]: points used per voxel (1 .. max_points_per_voxel).
    Dropped points: ``points_out_of_range`` (outside the range, or a non-finite channel),
    ``points_over_capacity`` (beyond max_points_per_voxel in a kept voxel) and the points of
    the ``voxels_over_capacity`` occupied voxels beyond max_voxels (``points_in_dropped_voxels``).
    """

    features: np.ndarray
    coords: np.ndarray
    point_count: np.ndarray
    points_out_of_range: int
    points_over_capacity: int
    voxels_over_capacity: int
    points_in_dropped_voxels: int

    @property
    def num_voxels(self) -> int:
        return int(self.coords.shape[0])


def voxel_indices(points: np.ndarray, config: VoxelizationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Points float32 [N, C] -> (inside bool [N], voxel index int64 [N_inside, 3] (ix, iy, iz)).

    ``inside``: every channel finite, min <= p < max on x, y, z and the index on ``config.grid_size``.
    """
    low = np.asarray(config.point_range_min, dtype=np.float32)
    high = np.asarray(config.point_range_max, dtype=np.float32)
    size = np.asarray(config.voxel_size, dtype=np.float32)
    xyz = points[:, :3]
    inside = np.all((xyz >= low) & (xyz < high), axis=1) & np.all(np.isfinite(points), axis=1)
    index = np.floor((xyz[inside] - low) / size).astype(np.int64)   # float32 throughout
    on_grid = np.all(index < np.asarray(config.grid_size), axis=1)  # index >= 0 since p >= min
    inside[inside] = on_grid
    return inside, index[on_grid]


@dataclass(frozen=True, eq=False)
class _VoxelGroups:
    """Points grouped by voxel: ``voxel`` int64 [N] (0-based, by first appearance), ``slot`` int64 [N]
    (earlier points of the same voxel), ``first_point`` int64 [V] (input row of each voxel's first
    point), ``size`` int64 [V] (points per voxel)."""

    voxel: np.ndarray
    slot: np.ndarray
    first_point: np.ndarray
    size: np.ndarray


def _group_by_voxel(keys: np.ndarray) -> _VoxelGroups:
    """One stable sort of the voxel keys int64 [N] gives voxel ids, arrival slots and first points."""
    order = np.argsort(keys, kind="stable")             # by voxel, then input order
    sorted_keys = keys[order]
    is_start = np.ones(keys.size, dtype=bool)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    starts = np.flatnonzero(is_start)
    size = np.diff(np.r_[starts, keys.size])
    group_of_sorted = np.repeat(np.arange(starts.size), size)
    first_point = order[starts]                        # stable: smallest input row of the voxel
    appearance = np.argsort(first_point)               # voxel groups by first appearance
    rank = np.empty_like(appearance)
    rank[appearance] = np.arange(appearance.size)
    voxel = np.empty_like(order)
    voxel[order] = rank[group_of_sorted]
    slot = np.empty_like(order)
    slot[order] = np.arange(keys.size) - starts[group_of_sorted]
    return _VoxelGroups(voxel, slot, first_point[appearance], size[appearance])


def voxelize(points: np.ndarray, config: VoxelizationConfig) -> Voxels:
    """Points float32 [N, C] (C >= 3, x y z first; fp16 is widened) -> :class:`Voxels`.

    Work is O(N log N) (one sort) and allocates a [M, max_points_per_voxel, C] float32 buffer,
    mmdet3d's hard-voxel layout. Its slots are summed in input order: for fp16 input (CUDA-BEVFusion's
    point type) the float32 sums are exact anyway, for float32 input the order decides the last bit.
    """
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be [N, C] with C >= 3 (x, y, z first), got shape {points.shape}")
    points = np.asarray(points, dtype=np.float32)
    inside, index = voxel_indices(points, config)
    points = points[inside]
    nx, ny, _ = config.grid_size
    groups = _group_by_voxel((index[:, 2] * ny + index[:, 1]) * nx + index[:, 0])
    num_voxels = min(groups.first_point.size, config.max_voxels)
    capacity = config.max_points_per_voxel
    used = (groups.voxel < num_voxels) & (groups.slot < capacity)
    slots = np.zeros((num_voxels, capacity, points.shape[1]), dtype=np.float32)
    slots[groups.voxel[used], groups.slot[used]] = points[used]
    sums = slots[:, 0].copy()
    for slot in range(1, capacity):                    # sequential float32 sum, input order
        sums += slots[:, slot]
    point_count = np.minimum(groups.size[:num_voxels], capacity).astype(np.int32)
    coords = np.zeros((num_voxels, 4), dtype=np.int32)
    coords[:, 1:] = index[groups.first_point[:num_voxels]]
    kept_voxel_points = int(groups.size[:num_voxels].sum())
    return Voxels(
        features=(sums / point_count[:, None].astype(np.float32)).astype(np.float16),
        coords=coords,
        point_count=point_count,
        points_out_of_range=int(inside.size - inside.sum()),
        points_over_capacity=kept_voxel_points - int(point_count.sum()),
        voxels_over_capacity=int(groups.first_point.size - num_voxels),
        points_in_dropped_voxels=int(points.shape[0] - kept_voxel_points),
    )
