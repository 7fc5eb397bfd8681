"""CuPy :func:`~bevfusion_ros.camera.depth.depth_map`: bit-identical to the NumPy version (spec 4).

Two kernels:

1. one thread per (point, camera) projects the point with the NumPy code's float32
   operations in the same order, each one rounded (``__fmul_rn``/``__fadd_rn``/``__fdiv_rn``,
   so NVRTC cannot contract them into fused multiply-adds), and ``atomicMax``-es the point
   index into an int32 winner map ``[N, H, W]`` initialised to -1: the highest index wins,
   as in NumPy, whatever the thread order;
2. one thread per pixel recomputes the winner's ``dist`` (the same rounded operations give
   the same bits) and stores it as fp16 (``cvt.rn``, round to nearest even like NumPy's
   ``astype``); pixels without a winner get 0.

CuPy is imported inside the functions: importing this module never needs it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from bevfusion_ros.camera.depth import check_inputs
from bevfusion_ros.camera.normalize_cuda import output_buffer

THREADS = 256
INT32_MAX = np.iinfo(np.int32).max

_DEPTH_SOURCE = r"""
// m0*a + m1*b + m2*c + m3 for one row m of a 4x4 float32 matrix, left to right, every
// operation rounded on its own (no FMA), as NumPy evaluates it.
__device__ __forceinline__ float affine_row(const float* m, float a, float b, float c) {
    return __fadd_rn(__fadd_rn(__fadd_rn(__fmul_rn(m[0], a), __fmul_rn(m[1], b)), __fmul_rn(m[2], c)), m[3]);
}

// clamp(h_2, 1e-5, 1e5) as np.clip: NaN stays NaN.
__device__ __forceinline__ float clamped_depth(const float* lidar2image, float x, float y, float z) {
    const float h = affine_row(lidar2image + 8, x, y, z);
    return h < 1e-5f ? 1e-5f : (h > 1e5f ? 1e5f : h);
}

// matrices: [N, 2, 4, 4] float32 (lidar2image, img_aug_matrix) per camera; xyz: [P, 3] float32.
extern "C" __global__ void depth_winners(
        const float* __restrict__ xyz, int points, const float* __restrict__ matrices,
        int height, int width, int* __restrict__ winner) {            // winner: [N, H, W], -1 = none
    const int point = blockIdx.x * blockDim.x + threadIdx.x;
    if (point >= points) return;
    const int camera = blockIdx.y;
    const float* lidar2image = matrices + 32 * camera;
    const float* augmentation = lidar2image + 16;
    const float* p = xyz + 3LL * point;
    const float x = p[0], y = p[1], z = p[2];
    const float dist = clamped_depth(lidar2image, x, y, z);
    const float u = __fdiv_rn(affine_row(lidar2image, x, y, z), dist);
    const float v = __fdiv_rn(affine_row(lidar2image + 4, x, y, z), dist);
    const float column = affine_row(augmentation, u, v, dist);
    const float row = affine_row(augmentation + 4, u, v, dist);
    if (column >= 0.0f && column < (float)width && row >= 0.0f && row < (float)height) {
        atomicMax(winner + ((long long)camera * height + (int)row) * width + (int)column, point);
    }
}

// depth: [N, H, W] fp16 bit patterns; one thread per pixel of camera blockIdx.y.
extern "C" __global__ void depth_gather(
        const float* __restrict__ xyz, const float* __restrict__ matrices,
        const int* __restrict__ winner, int pixels, unsigned short* __restrict__ depth) {
    const int pixel = blockIdx.x * blockDim.x + threadIdx.x;
    if (pixel >= pixels) return;
    const long long index = (long long)blockIdx.y * pixels + pixel;
    const int point = winner[index];
    unsigned short bits = 0;                                              // fp16 +0
    if (point >= 0) {
        const float* p = xyz + 3LL * point;
        const float dist = clamped_depth(matrices + 32 * blockIdx.y, p[0], p[1], p[2]);
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(dist));
    }
    depth[index] = bits;
}
"""


@lru_cache(maxsize=None)
def _depth_module():
    import cupy
    return cupy.RawModule(code=_DEPTH_SOURCE)


def _matrices(lidar2image: Any, img_aug_matrix: Any) -> Any:
    """float32 CuPy ``[N, 2, 4, 4]``: (lidar2image, img_aug_matrix) per camera, cast as NumPy does."""
    import cupy
    return cupy.ascontiguousarray(cupy.stack([cupy.asarray(lidar2image, dtype=cupy.float32),
                                              cupy.asarray(img_aug_matrix, dtype=cupy.float32)], axis=1))


def depth_map_cuda(points: Any, lidar2image: Any, img_aug_matrix: Any, height: int, width: int,
                   out: Any = None) -> Any:
    """Sparse depth images, CuPy fp16 ``[N, 1, height, width]``, as :func:`depth_map`.

    points ``[P, >=3]`` and the ``[N, 4, 4]`` matrices may be NumPy or CuPy (NumPy ones are
    uploaded); ``out``: optional C-contiguous CuPy float16 ``[N, 1, height, width]``.
    """
    import cupy
    check_inputs(points, lidar2image, img_aug_matrix)
    cameras, count = len(lidar2image), len(points)
    if count > INT32_MAX or cameras * height * width > INT32_MAX or cameras > 65535:
        raise ValueError(f"{count} points / {cameras} cameras of {height}x{width} exceed the kernels' "
                         "int32 indices")
    depth = output_buffer(out, (cameras, 1, height, width), np.float16)
    if depth.size == 0:
        return depth
    xyz = cupy.ascontiguousarray(cupy.asarray(points)[:, :3], dtype=cupy.float32)
    matrices = _matrices(lidar2image, img_aug_matrix)
    winner = cupy.full((cameras, height, width), -1, dtype=cupy.int32)
    module = _depth_module()
    if count:
        module.get_function("depth_winners")(
            (-(-count // THREADS), cameras), (THREADS,),
            (xyz, np.int32(count), matrices, np.int32(height), np.int32(width), winner))
    module.get_function("depth_gather")(
        (-(-(height * width) // THREADS), cameras), (THREADS,),
        (xyz, matrices, winner, np.int32(height * width), depth))
    return depth
