"""Lidar points -> sparse per-camera depth image at network-input resolution (spec 4).

For every point p = (x, y, z) and camera c, in float32 and in CUDA-BEVFusion's order of
operations (each sum left to right, no fused multiply-add)::

    h_r   = M[r,0]*x + M[r,1]*y + M[r,2]*z + M[r,3]            M = lidar2image_c, r = 0, 1, 2
    dist  = clamp(h_2, 1e-5, 1e5)                              camera-frame z, not the range
    u, v  = h_0 / dist, h_1 / dist
    col   = A[0,0]*u + A[0,1]*v + A[0,2]*dist + A[0,3]         A = img_aug_matrix_c
    row   = A[1,0]*u + A[1,1]*v + A[1,2]*dist + A[1,3]

and if ``0 <= col < width`` and ``0 <= row < height`` (tested in float), ``dist`` is written
as fp16 to pixel ``(int(row), int(col))``; all other pixels are 0.

Collisions (many points hitting one pixel, frequent with 10 sweeps): **the point with the
highest index wins**. CUDA-BEVFusion writes with plain parallel stores, so its winner is
arbitrary, and mit-han-lab's tensor index assignment leaves it unspecified too; neither uses
a z-buffer. We pick a deterministic rule so that NumPy, CuPy and the PyTorch reference can be
compared bit for bit. "Highest index" is what a sequential loop over the points produces
(last writer wins), and on a GPU it is an ``atomicMax`` on the point index followed by a
gather, with no ordering assumptions.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from bevfusion_ros.runtime.array_module import is_cupy

DEPTH_MIN = np.float32(1e-5)
DEPTH_MAX = np.float32(1e5)


def _affine_row(matrix: np.ndarray, row: int, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``m0*a + m1*b + m2*c + m3`` for float32 ``matrix [N, 4, 4]`` and point arrays ``[P]`` -> ``[N, P]``."""
    m = matrix[:, row, :, None]
    return m[:, 0] * a + m[:, 1] * b + m[:, 2] * c + m[:, 3]


def project_points(xyz: np.ndarray, lidar2image: np.ndarray, img_aug_matrix: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 ``xyz [P, 3]`` -> (dist, column, row), each float32 ``[N, P]``, in network pixels."""
    lidar2image = np.asarray(lidar2image, dtype=np.float32)
    img_aug_matrix = np.asarray(img_aug_matrix, dtype=np.float32)
    x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    dist = np.clip(_affine_row(lidar2image, 2, x, y, z), DEPTH_MIN, DEPTH_MAX)
    u = _affine_row(lidar2image, 0, x, y, z) / dist
    v = _affine_row(lidar2image, 1, x, y, z) / dist
    return dist, _affine_row(img_aug_matrix, 0, u, v, dist), _affine_row(img_aug_matrix, 1, u, v, dist)


def check_inputs(points: Any, lidar2image: Any, img_aug_matrix: Any) -> None:
    """Raise ``ValueError`` unless points are ``[P, >=3]`` and both matrices ``[N, 4, 4]``."""
    if np.ndim(points) != 2 or np.shape(points)[1] < 3:
        raise ValueError(f"points must be [P, >=3] (x, y, z, ...), got shape {list(np.shape(points))}")
    cameras = len(lidar2image)
    if np.shape(lidar2image) != (cameras, 4, 4) or np.shape(img_aug_matrix) != (cameras, 4, 4):
        raise ValueError(f"lidar2image and img_aug_matrix must both be [N, 4, 4], got "
                         f"{list(np.shape(lidar2image))} and {list(np.shape(img_aug_matrix))}")


def depth_map(points: np.ndarray, lidar2image: np.ndarray, img_aug_matrix: np.ndarray,
              height: int, width: int, out: Any = None) -> np.ndarray:
    """Sparse depth images fp16 ``[N, 1, height, width]``.

    points:         ``[P, >=3]`` lidar points (x, y, z first; fp16 or float32, used as float32);
    lidar2image:    ``[N, 4, 4]`` per camera (rows 0-2 used, cast to float32);
    img_aug_matrix: ``[N, 4, 4]`` per camera (rows 0-1 used, cast to float32).

    If any argument is a CuPy array the map is computed on the GPU (bit-identical) and
    returned as CuPy, written into ``out`` when given (CuPy float16 ``[N, 1, height, width]``;
    CuPy only).
    """
    if any(is_cupy(array) for array in (points, lidar2image, img_aug_matrix)):
        from bevfusion_ros.camera.depth_cuda import depth_map_cuda
        return depth_map_cuda(points, lidar2image, img_aug_matrix, height, width, out)
    if out is not None:
        raise ValueError("out= is supported for CuPy inputs only")
    points = np.asarray(points)
    check_inputs(points, lidar2image, img_aug_matrix)
    cameras = len(lidar2image)
    xyz = points[:, :3].astype(np.float32)
    dist, column, row = project_points(xyz, lidar2image, img_aug_matrix)
    inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
    camera, point = np.nonzero(inside)                        # point ascending within a camera
    pixel = (camera * height + row[inside].astype(np.int64)) * width + column[inside].astype(np.int64)
    winner = np.full(cameras * height * width, -1, dtype=np.int64)
    np.maximum.at(winner, pixel, point)                       # highest point index wins
    depth = np.zeros(cameras * height * width, dtype=np.float16)
    hit = np.flatnonzero(winner >= 0)
    depth[hit] = dist.reshape(-1)[(hit // (height * width)) * len(xyz) + winner[hit]]
    return depth.reshape(cameras, 1, height, width)
