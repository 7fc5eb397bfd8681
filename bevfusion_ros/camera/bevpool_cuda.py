"""CuPy :func:`~bevfusion_ros.camera.bevpool.bev_pool`: one thread per (BEV cell, group of 8 channels).

Tables built once per calibration on the device by :func:`pool_tables` (called from
:meth:`CameraGeometry.to_device`, kept in ``geometry.pool_tables``) give each thread its slot's
sorted points, which it accumulates in float32 with fused multiply-adds like CUDA-BEVFusion's
kernel (spec 3.5). Every load path and output layout gives bit-identical float32 sums; GPU and
NumPy agree to float32 rounding (tested); results are deterministic. The tables, the schedule,
the load paths, the output layouts and why it agrees with :func:`bev_pool`: docs/pipeline.md,
"BEVPool on the GPU".

Features and weights are read as float16 or float32 directly (other float dtypes are cast to
float32 first). CuPy is imported inside the functions: importing this module never needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from bevfusion_ros.camera.bevpool import check_inputs, feature_rows
from bevfusion_ros.camera.geometry import CameraGeometry
from bevfusion_ros.runtime.array_module import get_array_module, is_cupy

CHANNEL_GROUP = 8        # channels per thread: 8 float32 accumulators in registers
THREADS = 256
INT32_MAX = int(np.iinfo(np.int32).max)
INDEX_MARGIN = 64        # the kernel computes point positions up to 2 batches (16) past an interval's end
# NumPy dtype -> C type the kernel reads or writes (fp16 as its bit pattern).
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float16): "unsigned short"}
LOAD_SCALAR, LOAD_VECTOR = 0, 1
STORE_CHANNEL_MAJOR, STORE_CHANNELS_LAST, STORE_CHANNELS_LAST_VECTOR = 0, 1, 2

_BEV_POOL_SOURCE = r"""
// LOAD:  0 = CHANNEL_GROUP scalar loads per point (fp16 or fp32, any C);
//        1 = one 16-byte load of 8 fp16 channels (fp16, C % 8 == 0, 16-byte aligned feature).
// STORE: 0 = channel-major [C, X * Y], scalar;  1 = channels-last [X * Y, C], scalar;
//        2 = channels-last, 16-byte stores (C % 8 == 0, 16-byte aligned output).
static_assert(CHANNEL_GROUP == 8, "the 16-byte loads and stores carry 8 channels");

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(unsigned short bits) {          // fp16 bits -> float32, exact
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits));
    return value;
}
__device__ __forceinline__ unsigned short to_half(float value) {          // round to nearest even
    unsigned short bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
    return bits;
}
__device__ __forceinline__ void store(float* p, float value) { *p = value; }
__device__ __forceinline__ void store(unsigned short* p, float value) { *p = to_half(value); }
__device__ __forceinline__ unsigned int pack_half2(float low, float high) {   // low = lower address
    return (unsigned int)to_half(low) | ((unsigned int)to_half(high) << 16);
}
__device__ __forceinline__ void store8(float* p, const float* sum) {          // 2 x 16 bytes
    float4* q = reinterpret_cast<float4*>(p);
    q[0] = make_float4(sum[0], sum[1], sum[2], sum[3]);
    q[1] = make_float4(sum[4], sum[5], sum[6], sum[7]);
}
__device__ __forceinline__ void store8(unsigned short* p, const float* sum) { // 1 x 16 bytes
    *reinterpret_cast<uint4*>(p) = make_uint4(pack_half2(sum[0], sum[1]), pack_half2(sum[2], sum[3]),
                                              pack_half2(sum[4], sum[5]), pack_half2(sum[6], sum[7]));
}
// sum[k] += channel k of 8 packed fp16 values (little endian: channel 2i is the low half of word i).
__device__ __forceinline__ void fma8(float* sum, const uint4 value, const float weight) {
    sum[0] = __fmaf_rn(to_float((unsigned short)(value.x & 0xffffu)), weight, sum[0]);
    sum[1] = __fmaf_rn(to_float((unsigned short)(value.x >> 16)), weight, sum[1]);
    sum[2] = __fmaf_rn(to_float((unsigned short)(value.y & 0xffffu)), weight, sum[2]);
    sum[3] = __fmaf_rn(to_float((unsigned short)(value.y >> 16)), weight, sum[3]);
    sum[4] = __fmaf_rn(to_float((unsigned short)(value.z & 0xffffu)), weight, sum[4]);
    sum[5] = __fmaf_rn(to_float((unsigned short)(value.z >> 16)), weight, sum[5]);
    sum[6] = __fmaf_rn(to_float((unsigned short)(value.w & 0xffffu)), weight, sum[6]);
    sum[7] = __fmaf_rn(to_float((unsigned short)(value.w >> 16)), weight, sum[7]);
}
// next[b] = points[t + b], or (0, 0) past the interval's end.
template <int BATCH>
__device__ __forceinline__ void load_points(int2* next, const int2* __restrict__ points, int t, int end) {
#pragma unroll
    for (int b = 0; b < BATCH; ++b) next[b] = t + b < end ? __ldg(points + t + b) : make_int2(0, 0);
}

template <typename Feature, typename Weight, typename Out, int LOAD, int STORE>
__global__ void __launch_bounds__(THREADS) bev_pool(
        const Feature* __restrict__ feature,      // [N * fH * fW, C] (NHWC)
        const Weight* __restrict__ weights,       // [N * D * fH * fW]
        const int2* __restrict__ points,          // [keep_count] (feature row, weight index), sorted
        const int* __restrict__ slots,            // [slot_count, 3] (start, end, cell): every cell once
        int slot_count, int channels, int groups,
        int cells,                                // X * Y
        Out* __restrict__ bev) {                  // STORE 0: [C, X * Y]; else [X * Y, C]
    constexpr int BATCH = LOAD == 1 ? 8 : 4;
    const int thread = blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= slot_count * groups) return;
    const int slot = thread / groups;
    const int group = thread - slot * groups;
    const int first = group * CHANNEL_GROUP;
    const int start = slots[3 * slot], end = slots[3 * slot + 1], cell = slots[3 * slot + 2];
    float sum[CHANNEL_GROUP];
#pragma unroll
    for (int k = 0; k < CHANNEL_GROUP; ++k) sum[k] = 0.0f;
    int2 next[BATCH], point[BATCH];
    float weight[BATCH];
    load_points<BATCH>(next, points, start, end);
    for (int t = start; t < end; t += BATCH) {
#pragma unroll
        for (int b = 0; b < BATCH; ++b) point[b] = next[b];
        if (LOAD == 1) {
            const uint4* column = reinterpret_cast<const uint4*>(feature) + group;
            uint4 value[BATCH];
#pragma unroll
            for (int b = 0; b < BATCH; ++b) {                  // the whole batch's loads in flight
                const bool valid = t + b < end;
                weight[b] = valid ? to_float(__ldg(weights + point[b].y)) : 0.0f;
                value[b] = valid ? __ldg(column + (long long)point[b].x * groups) : make_uint4(0u, 0u, 0u, 0u);
            }
            load_points<BATCH>(next, points, t + BATCH, end);  // prefetch the next batch
#pragma unroll
            for (int b = 0; b < BATCH; ++b) {                  // accumulate in point order
                if (t + b < end) fma8(sum, value[b], weight[b]);
            }
        } else {
            float value[BATCH][CHANNEL_GROUP];
#pragma unroll
            for (int b = 0; b < BATCH; ++b) {
                const bool valid = t + b < end;
                weight[b] = valid ? to_float(__ldg(weights + point[b].y)) : 0.0f;
                const Feature* row = feature + (long long)point[b].x * channels + first;
#pragma unroll
                for (int k = 0; k < CHANNEL_GROUP; ++k) {
                    value[b][k] = valid && first + k < channels ? to_float(__ldg(row + k)) : 0.0f;
                }
            }
            load_points<BATCH>(next, points, t + BATCH, end);
#pragma unroll
            for (int b = 0; b < BATCH; ++b) {
                if (t + b < end) {
#pragma unroll
                    for (int k = 0; k < CHANNEL_GROUP; ++k) sum[k] = __fmaf_rn(value[b][k], weight[b], sum[k]);
                }
            }
        }
    }
    if (STORE == 0) {
        Out* out = bev + (long long)first * cells + cell;
#pragma unroll
        for (int k = 0; k < CHANNEL_GROUP; ++k) {
            if (first + k < channels) store(out + (long long)k * cells, sum[k]);
        }
    } else if (STORE == 1) {
        Out* out = bev + (long long)cell * channels + first;
#pragma unroll
        for (int k = 0; k < CHANNEL_GROUP; ++k) {
            if (first + k < channels) store(out + k, sum[k]);
        }
    } else {
        store8(bev + (long long)cell * channels + first, sum);
    }
}
"""


@dataclass(frozen=True)
class PoolTables:
    """Device tables of one geometry for the kernel (docs/pipeline.md); from :func:`pool_tables`.

    points: int32 ``[keep_count, 2]`` (feature row, frustum point id) per sorted point;
    slots:  int32 ``[X * Y, 3]`` (start, end, cell): intervals longest first, then empty cells;
    indices, intervals: the geometry arrays they were built from (checked by identity before use).
    """

    points: Any
    slots: Any
    indices: Any
    intervals: Any


def pool_tables(indices: Any, intervals: Any, frustum_shape: tuple[int, int, int, int],
                bev_size: tuple[int, int]) -> PoolTables:
    """The kernel's tables for a geometry's ``indices`` and ``intervals`` (CuPy; NumPy works too).

    Computed where the arrays live (on the device for :meth:`CameraGeometry.to_device`).
    Raises ``ValueError`` when the frustum, the points or the grid do not fit int32.
    """
    xp = get_array_module(indices, intervals)
    cells = bev_size[0] * bev_size[1]
    frustum_points = int(np.prod(frustum_shape, dtype=np.int64))
    if frustum_points > INT32_MAX or len(indices) > INT32_MAX - INDEX_MARGIN or 3 * cells > INT32_MAX:
        raise ValueError("geometry too large for the kernel's int32 indices")
    ids = indices.astype(xp.int64)
    points = xp.ascontiguousarray(xp.stack([feature_rows(ids, frustum_shape), ids], axis=1), dtype=xp.int32)
    bounds = intervals.astype(xp.int64).reshape(-1, 3)
    lengths = bounds[:, 1] - bounds[:, 0]
    order = xp.argsort(bounds[:, 2] - lengths * cells)       # longest first, then by cell (unique keys)
    occupied = xp.zeros(cells, dtype=bool)
    occupied[bounds[:, 2]] = True
    empty = xp.flatnonzero(~occupied)
    empty_slots = xp.stack([xp.zeros_like(empty), xp.zeros_like(empty), empty], axis=1)
    slots = xp.ascontiguousarray(xp.concatenate([bounds[order], empty_slots.astype(xp.int64)]), dtype=xp.int32)
    return PoolTables(points=points, slots=slots, indices=indices, intervals=intervals)


def geometry_tables(geometry: CameraGeometry) -> PoolTables:
    """``geometry.pool_tables`` if built from its current arrays, else built now (once per call)."""
    tables = geometry.pool_tables
    if tables is None or tables.indices is not geometry.indices or tables.intervals is not geometry.intervals:
        tables = pool_tables(geometry.indices, geometry.intervals, geometry.frustum_shape, geometry.bev_size)
    return tables


@lru_cache(maxsize=None)
def _pool_kernel(feature_type: str, weight_type: str, out_type: str, load: int, store: int):
    """The compiled ``bev_pool<feature_type, weight_type, out_type, load, store>`` (C type names)."""
    import cupy
    name = f"bev_pool<{feature_type}, {weight_type}, {out_type}, {load}, {store}>"
    module = cupy.RawModule(code=_BEV_POOL_SOURCE,
                            options=(f"-DCHANNEL_GROUP={CHANNEL_GROUP}", f"-DTHREADS={THREADS}"),
                            name_expressions=(name,))
    return module.get_function(name)


def _kernel_input(array: Any) -> Any:
    """C-contiguous CuPy copy of ``array`` (uploaded if NumPy) in float16 or float32."""
    import cupy
    array = cupy.asarray(array)
    return cupy.ascontiguousarray(array, dtype=array.dtype if array.dtype in C_TYPES else cupy.float32)


def _output(out: Any, channels: int, nx: int, ny: int) -> tuple[Any, Any, bool]:
    """(array to return ``[1, C, X, Y]``, buffer the kernel writes, whether it is channels-last).

    ``out=None`` gives a new float32 channels-last BEV. A given ``out`` (float32 or float16) is
    used as it is: C-contiguous (channel-major buffer) or a channels-last view, i.e. one whose
    ``out.transpose(0, 2, 3, 1)`` is C-contiguous (that transpose is the buffer).
    """
    import cupy
    shape = (1, channels, nx, ny)
    if out is None:
        nhwc = cupy.empty((1, nx, ny, channels), dtype=cupy.float32)
        return nhwc.transpose(0, 3, 1, 2), nhwc, True
    dtype = np.dtype(getattr(out, "dtype", np.float32))
    if dtype not in C_TYPES:
        raise ValueError(f"out must be float32 or float16, got {dtype}")
    if isinstance(out, cupy.ndarray) and out.shape == shape:
        if out.flags.c_contiguous:
            return out, out, False
        nhwc = out.transpose(0, 2, 3, 1)
        if nhwc.flags.c_contiguous:
            return out, nhwc, True
    raise ValueError(f"out must be a CuPy float32/float16 array of shape {list(shape)}, C-contiguous or a "
                     f"channels-last view (nhwc.transpose(0, 3, 1, 2) of a C-contiguous [1, X, Y, C]); "
                     f"got {type(out).__name__} {list(getattr(out, 'shape', ()))} "
                     f"strides {getattr(out, 'strides', None)}")


def bev_pool_cuda(camera_feature: Any, depth_weights: Any, geometry: CameraGeometry, out: Any = None) -> Any:
    """Camera BEV CuPy ``[1, C, X, Y]`` (float32, or the dtype of ``out``), as :func:`bev_pool`.

    camera_feature ``[N, fH, fW, C]`` and depth_weights ``[N, D, fH, fW]`` may be NumPy or
    CuPy; ``geometry`` must be on the device (:meth:`CameraGeometry.to_device`, once per
    calibration). Without ``out`` the result is a channels-last view (strides of
    ``[1, X, Y, C]``) of a new float32 buffer. ``out``: a CuPy float32/float16 ``[1, C, X, Y]``,
    either C-contiguous or such a channels-last view; it is returned, every element written.
    """
    check_inputs(camera_feature, depth_weights, geometry)
    if not (is_cupy(geometry.indices) and is_cupy(geometry.intervals)):
        raise ValueError("geometry is on the host: upload it once with geometry.to_device()")
    channels, (nx, ny) = camera_feature.shape[3], geometry.bev_size
    result, buffer, channels_last = _output(out, channels, nx, ny)
    tables = geometry_tables(geometry)
    groups, slot_count = -(-channels // CHANNEL_GROUP), len(tables.slots)
    if slot_count * groups > INT32_MAX - THREADS:
        raise ValueError("geometry too large for the kernel's int32 indices")
    if slot_count * groups == 0:                 # no channel or no cell: nothing to write
        return result
    feature, weights = _kernel_input(camera_feature), _kernel_input(depth_weights)
    vector = channels % CHANNEL_GROUP == 0
    load = LOAD_VECTOR if vector and feature.dtype == np.float16 and feature.data.ptr % 16 == 0 else LOAD_SCALAR
    if not channels_last:
        store = STORE_CHANNEL_MAJOR
    else:
        store = STORE_CHANNELS_LAST_VECTOR if vector and buffer.data.ptr % 16 == 0 else STORE_CHANNELS_LAST
    kernel = _pool_kernel(C_TYPES[feature.dtype], C_TYPES[weights.dtype], C_TYPES[buffer.dtype], load, store)
    kernel((-(-slot_count * groups // THREADS),), (THREADS,), (
        feature, weights, tables.points, tables.slots, np.int32(slot_count), np.int32(channels),
        np.int32(groups), np.int32(nx * ny), buffer))
    return result
