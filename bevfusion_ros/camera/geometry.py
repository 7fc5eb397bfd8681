"""LSS camera geometry: frustum -> lidar frame -> BEV cell, sorted into pooling intervals.

Computed once per calibration (spec 3.2-3.3), then reused by :func:`bev_pool` every frame; in
float64 like the PyTorch reference, with CUDA-BEVFusion's float32 grid constants. The frustum
point numbering, the steps, the grid constants and the quirk choices between CUDA-BEVFusion and
mit-han-lab (``camera0_augmentation``, ``last_interval``, ...): docs/pipeline.md, "Camera
geometry".
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from bevfusion_ros.config import CameraGeometryConfig, ImageConfig, PipelineConfig
from bevfusion_ros.io.calibration import Calibration

LastInterval = Literal["exclusive", "cuda"]


@dataclass(frozen=True)
class CameraGeometry:
    """Frustum-point -> BEV-cell assignment of one calibration, sorted for pooling.

    indices:       int64 ``[keep_count]``: ids of the kept frustum points (see module doc),
                   stably sorted by BEV cell, so ascending within a cell;
    intervals:     int32 ``[n, 3]`` rows ``(start, end, bev_offset)``: positions ``[start, end)``
                   of ``indices`` that fall into BEV cell ``bev_offset = ix * Y + iy``; cells
                   ascending, intervals contiguous (``end_i == start_{i+1}``); the last one
                   ends at ``keep_count`` or, with ``last_interval="cuda"``, ``keep_count - 1``;
    keep_count:    number of kept frustum points;
    bev_size:      ``(X, Y)`` cells of the camera BEV;
    frustum_shape: ``(N, D, fH, fW)``, the shape of the depth weights this geometry pools;
    pool_tables:   None on the host; set by :meth:`to_device`: the CUDA kernel's device tables
                   (:class:`~bevfusion_ros.camera.bevpool_cuda.PoolTables`: int32 feature row
                   and point id per sorted point, intervals longest first plus the empty cells).
                   The NumPy path ignores it.
    """

    indices: np.ndarray
    intervals: np.ndarray
    keep_count: int
    bev_size: tuple[int, int]
    frustum_shape: tuple[int, int, int, int]
    pool_tables: Any = field(default=None, repr=False, compare=False)

    def to_device(self) -> CameraGeometry:
        """Copy whose ``indices`` and ``intervals`` are CuPy arrays on the current device.

        Upload once per calibration and pass the copy to :func:`bev_pool` with CuPy features;
        dtypes and layouts stay the same (arrays already on that device are not copied). It also
        builds ``pool_tables`` on the device (kept when already built from these arrays), so a
        second ``to_device`` uploads and computes nothing.
        """
        import cupy

        from bevfusion_ros.camera.bevpool_cuda import geometry_tables
        device = replace(self, indices=cupy.asarray(self.indices), intervals=cupy.asarray(self.intervals))
        return replace(device, pool_tables=geometry_tables(device))


def frustum(image: ImageConfig, geometry: CameraGeometryConfig) -> np.ndarray:
    """float64 ``[D, fH, fW, 3]``: (u, v, d) of every frustum point, u/v in network-input pixels."""
    depth = np.arange(geometry.depth_bins, dtype=np.float64) * geometry.dbound[2] + geometry.dbound[0]
    v = np.linspace(0, image.output_height - 1, geometry.feature_height, dtype=np.float64)
    u = np.linspace(0, image.output_width - 1, geometry.feature_width, dtype=np.float64)
    dd, vv, uu = np.meshgrid(depth, v, u, indexing="ij")
    return np.stack([uu, vv, dd], axis=-1)


def grid_constants(geometry: CameraGeometryConfig) -> tuple[np.ndarray, np.ndarray]:
    """(lower edge, step) float64 ``[3]`` of the x, y, z grid from CUDA's float32 bx/dx."""
    bounds = (geometry.xbound, geometry.ybound, geometry.zbound)
    step = np.array([np.float32(b[2]) for b in bounds], dtype=np.float64)
    centre = np.array([np.float32(b[0] + b[2] / 2.0) for b in bounds], dtype=np.float64)
    return centre - step / 2.0, step


def frustum_to_lidar(points: np.ndarray, augmentation: np.ndarray, intrinsics: np.ndarray,
                     camera2lidar: np.ndarray) -> np.ndarray:
    """float64 frustum ``[P, 3]`` (u, v, d) -> lidar-frame ``[P, 3]`` for one camera's 4x4 matrices."""
    original = np.linalg.solve(augmentation[:3, :3], (points - augmentation[:3, 3]).T).T
    lifted = np.concatenate([original[:, :2] * original[:, 2:], original[:, 2:]], axis=1)
    in_camera = np.linalg.solve(intrinsics[:3, :3], lifted.T).T
    return in_camera @ camera2lidar[:3, :3].T + camera2lidar[:3, 3]


def bev_cells(in_lidar: np.ndarray, geometry: CameraGeometryConfig) -> tuple[np.ndarray, np.ndarray]:
    """Lidar points ``[P, 3]`` -> (kept bool ``[P]``, flat cell ``ix * Y + iy`` int64 ``[P]``)."""
    lower, step = grid_constants(geometry)
    index = np.trunc((in_lidar - lower) / step).astype(np.int64)      # toward zero, like int()
    size = np.array(geometry.bev_size)
    kept = ((index >= 0) & (index < size)).all(axis=1)
    return kept, index[:, 0] * size[1] + index[:, 1]


def interval_bounds(sorted_cells: np.ndarray, cuda_last_interval: bool) -> np.ndarray:
    """int32 ``[n, 3]`` (start, end, cell) of the runs of equal values in ``sorted_cells`` (>= 0).

    With ``cuda_last_interval`` the last run ends one early, at ``len - 1``, as in CUDA-BEVFusion.
    """
    starts = np.flatnonzero(np.diff(sorted_cells, prepend=-1))
    ends = np.append(starts[1:], len(sorted_cells))[:len(starts)]
    if cuda_last_interval and len(ends):
        ends[-1] -= 1
    return np.stack([starts, ends, sorted_cells[starts]], axis=1).astype(np.int32)


def compute_geometry(calibration: Calibration, config: PipelineConfig, camera0_augmentation: bool = False,
                     last_interval: LastInterval = "exclusive") -> CameraGeometry:
    """Sorted frustum -> BEV assignment of ``calibration`` (quirks: docs/pipeline.md)."""
    if last_interval not in ("exclusive", "cuda"):
        raise ValueError(f"last_interval must be 'exclusive' or 'cuda', got {last_interval!r}")
    geometry = config.camera_geometry
    nx, ny, nz = geometry.bev_size
    if nz != 1:
        raise ValueError(f"camera_geometry.zbound gives {nz} z cells; the camera BEV supports exactly 1")
    points = frustum(config.image, geometry)
    per_camera = points.shape[0] * points.shape[1] * points.shape[2]
    points = points.reshape(-1, 3)
    kept_ids, kept_cells = [], []
    for camera in range(calibration.num_cameras):
        augmentation = calibration.img_aug_matrix[0 if camera0_augmentation else camera]
        in_lidar = frustum_to_lidar(points, augmentation, calibration.camera_intrinsics[camera],
                                    calibration.camera2lidar[camera])
        kept, cells = bev_cells(in_lidar, geometry)
        kept_ids.append(np.flatnonzero(kept) + camera * per_camera)
        kept_cells.append(cells[kept])
    ids, cells = np.concatenate(kept_ids), np.concatenate(kept_cells)
    order = np.argsort(cells, kind="stable")     # ids ascending within a cell, like CUDA's thrust sort
    indices, intervals = ids[order], interval_bounds(cells[order], last_interval == "cuda")
    indices.flags.writeable = intervals.flags.writeable = False      # shared by every frame
    return CameraGeometry(
        indices=indices,
        intervals=intervals,
        keep_count=len(ids),
        bev_size=(nx, ny),
        frustum_shape=(calibration.num_cameras, geometry.depth_bins, geometry.feature_height,
                       geometry.feature_width),
    )
