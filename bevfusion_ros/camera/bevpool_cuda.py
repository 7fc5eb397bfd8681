"""CuPy :func:`~bevfusion_ros.camera.bevpool.bev_pool`: one thread per (interval, group of channels).

Thread ``t`` takes interval ``t // groups`` and the ``CHANNEL_GROUP`` channels starting at
``(t % groups) * CHANNEL_GROUP`` (the last group may be partial, so any C works). It walks the
interval's sorted points in order and accumulates ``F[cam(n), pix(n), c] * W_flat[n]`` in
float32 with fused multiply-adds, one accumulator per channel, like CUDA-BEVFusion's kernel
(spec 3.5); every (cell, channel) is written by exactly one thread, so the result is
deterministic. Cells without an interval keep the zero fill.

Difference to the NumPy version: NumPy rounds each product and sums an interval pairwise
(``np.add.reduceat``); here products are fused and the sum is sequential. Both are float32
sums of the same terms, so they agree to float32 rounding: |GPU - NumPy| stays below
``1e-5 * sum |F * W|`` of the cell (tested), not bit for bit.

Features and weights are read as float16 or float32 directly (other float dtypes are cast to
float32 first); the output is float32 or, with a float16 ``out``, fp16 (round to nearest
even). CuPy is imported inside the functions: importing this module never needs it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from bevfusion_ros.array_module import is_cupy
from bevfusion_ros.camera.bevpool import check_inputs
from bevfusion_ros.camera.geometry import CameraGeometry
from bevfusion_ros.camera.normalize_cuda import output_buffer

CHANNEL_GROUP = 8        # channels per thread: 8 float32 accumulators in registers
THREADS = 256
INT32_MAX = np.iinfo(np.int32).max
# NumPy dtype -> C type the kernel reads or writes (fp16 as its bit pattern).
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float16): "unsigned short"}

_BEV_POOL_SOURCE = r"""
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const unsigned short* p) {          // fp16 bits -> float32
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(*p));
    return value;
}
__device__ __forceinline__ void store(float* p, float value) { *p = value; }
__device__ __forceinline__ void store(unsigned short* p, float value) {   // round to nearest even
    unsigned short bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
    *p = bits;
}

template <typename Feature, typename Weight, typename Out>
__global__ void bev_pool(
        const Feature* __restrict__ feature,      // [N * fH * fW, C] (NHWC)
        const Weight* __restrict__ weights,       // [N * D * fH * fW]
        const long long* __restrict__ indices,    // [keep_count] frustum point ids, sorted by cell
        const int* __restrict__ intervals,        // [n, 3] (start, end, cell)
        int interval_count, int channels, int groups,
        int camera_points,                        // D * fH * fW
        int pixels,                               // fH * fW
        int cells,                                // X * Y
        Out* __restrict__ bev) {                  // [C, X * Y], zero-filled by the caller
    const int thread = blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= interval_count * groups) return;
    const int interval = thread / groups;
    const int first = (thread - interval * groups) * CHANNEL_GROUP;
    const int* bounds = intervals + 3 * interval;
    const int end = bounds[1];
    float sum[CHANNEL_GROUP];
#pragma unroll
    for (int k = 0; k < CHANNEL_GROUP; ++k) sum[k] = 0.0f;
#pragma unroll 4
    for (int t = bounds[0]; t < end; ++t) {
        const int n = (int)indices[t];
        const float weight = load(weights + n);
        const long long pixel = (long long)(n / camera_points) * pixels + n % pixels;   // feature row
        const Feature* row = feature + pixel * channels + first;
#pragma unroll
        for (int k = 0; k < CHANNEL_GROUP; ++k) {
            if (first + k < channels) sum[k] = __fmaf_rn(load(row + k), weight, sum[k]);
        }
    }
    Out* out = bev + (long long)first * cells + bounds[2];
#pragma unroll
    for (int k = 0; k < CHANNEL_GROUP; ++k) {
        if (first + k < channels) store(out + (long long)k * cells, sum[k]);
    }
}
"""


@lru_cache(maxsize=None)
def _pool_kernel(feature_type: str, weight_type: str, out_type: str):
    """The compiled ``bev_pool<feature_type, weight_type, out_type>`` (C type names)."""
    import cupy
    name = f"bev_pool<{feature_type}, {weight_type}, {out_type}>"
    module = cupy.RawModule(code=_BEV_POOL_SOURCE, options=(f"-DCHANNEL_GROUP={CHANNEL_GROUP}",),
                            name_expressions=(name,))
    return module.get_function(name)


def _kernel_input(array: Any) -> Any:
    """C-contiguous CuPy copy of ``array`` (uploaded if NumPy) in float16 or float32."""
    import cupy
    array = cupy.asarray(array)
    return cupy.ascontiguousarray(array, dtype=array.dtype if array.dtype in C_TYPES else cupy.float32)


def _output(out: Any, shape: tuple[int, ...]) -> Any:
    """Zero-filled float32 BEV, or ``out`` (float32 or float16) zero-filled."""
    dtype = np.dtype(np.float32 if out is None else getattr(out, "dtype", np.float32))
    if dtype not in C_TYPES:
        raise ValueError(f"out must be float32 or float16, got {dtype}")
    bev = output_buffer(out, shape, dtype)
    bev.fill(0)
    return bev


def bev_pool_cuda(camera_feature: Any, depth_weights: Any, geometry: CameraGeometry, out: Any = None) -> Any:
    """Camera BEV CuPy ``[1, C, X, Y]`` (float32, or the dtype of ``out``), as :func:`bev_pool`.

    camera_feature ``[N, fH, fW, C]`` and depth_weights ``[N, D, fH, fW]`` may be NumPy or
    CuPy; ``geometry`` must be on the device (:meth:`CameraGeometry.to_device`, once per
    calibration); ``out``: optional C-contiguous CuPy float32/float16 ``[1, C, X, Y]``.
    """
    import cupy
    check_inputs(camera_feature, depth_weights, geometry)
    if not (is_cupy(geometry.indices) and is_cupy(geometry.intervals)):
        raise ValueError("geometry is on the host: upload it once with geometry.to_device()")
    cameras, depth_bins, height, width = geometry.frustum_shape
    channels, (nx, ny) = camera_feature.shape[3], geometry.bev_size
    bev = _output(out, (1, channels, nx, ny))
    groups, interval_count = -(-channels // CHANNEL_GROUP), len(geometry.intervals)
    if interval_count * groups > INT32_MAX or cameras * depth_bins * height * width > INT32_MAX:
        raise ValueError("geometry too large for the kernel's int32 indices")
    if interval_count * groups == 0:
        return bev
    feature, weights = _kernel_input(camera_feature), _kernel_input(depth_weights)
    kernel = _pool_kernel(C_TYPES[feature.dtype], C_TYPES[weights.dtype], C_TYPES[bev.dtype])
    kernel((-(-interval_count * groups // THREADS),), (THREADS,), (
        feature, weights, cupy.ascontiguousarray(geometry.indices, dtype=cupy.int64),
        cupy.ascontiguousarray(geometry.intervals, dtype=cupy.int32), np.int32(interval_count),
        np.int32(channels), np.int32(groups), np.int32(depth_bins * height * width),
        np.int32(height * width), np.int32(nx * ny), bev))
    return bev
