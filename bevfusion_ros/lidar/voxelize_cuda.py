"""CuPy :func:`~bevfusion_ros.lidar.voxelize.voxelize`: three RawKernels, one sort, one compaction.

Bit-identical to the NumPy voxelizer (same voxel order, coords, point counts, fp16 feature bits and
drop counters), whose semantics are stated in :mod:`bevfusion_ros.lidar.voxelize`. The kernels,
why the bits match, the work and the int64 key limit: docs/pipeline.md, "Voxelization on the
GPU". Kernels run on the current CuPy stream. CuPy is imported inside the functions: importing
this module never needs it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from bevfusion_ros.config import VoxelizationConfig
from bevfusion_ros.lidar.voxelize import Voxels

_BLOCK = 256                     # a multiple of 32: voxel_means reduces its counters per warp
_MAX_BLOCKS = 1 << 16            # grid-stride loops cover the rest
INT64_MAX = int(np.iinfo(np.int64).max)
# Point dtype -> the C type the kernels read (fp16 as its bit pattern).
POINT_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float16): "unsigned short"}

_VOXELIZE_SOURCE = r"""
typedef POINT_TYPE Point;

#define GRID_STRIDE_LOOP(index, total) \
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < (total); \
         index += (long long)blockDim.x * gridDim.x)

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const unsigned short* p) {          // fp16 bits -> float32, exact
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(*p));
    return value;
}

__device__ __forceinline__ unsigned short to_half(float value) {          // round to nearest even
    unsigned short bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
    return bits;
}

/* IEEE float32 add, subtract and divide with subnormals kept, as NumPy computes them: CuPy
   compiles every kernel with -ftz=true (and a user's -ftz=false is overridden), which would
   flush subnormal operands and results (e.g. -1e-45 + 0 -> +0 instead of NumPy's -1e-45 and
   a -0.0 mean); explicit PTX without .ftz is immune to that flag. */
__device__ __forceinline__ float add_rn(float a, float b) {
    float value;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(value) : "f"(a), "f"(b));
    return value;
}
__device__ __forceinline__ float sub_rn(float a, float b) {
    float value;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(value) : "f"(a), "f"(b));
    return value;
}
__device__ __forceinline__ float div_rn(float a, float b) {
    float value;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(value) : "f"(a), "f"(b));
    return value;
}

__device__ __forceinline__ bool is_finite(float value) {                  // exponent not all ones
    return (__float_as_uint(value) & 0x7f800000u) != 0x7f800000u;
}

/* Voxel index along one axis, NumPy's float32 floor((p - low) / size): false when p is outside
   [low, high) (NaN included) or the index is not below cells (it is >= 0 since p >= low). */
__device__ __forceinline__ bool axis_index(float p, float low, float high, float size,
                                           long long cells, long long* index) {
    if (!(p >= low && p < high)) return false;
    const float floored = floorf(div_rn(sub_rn(p, low), size));
    if (!((double)floored < (double)cells)) return false;
    *index = (long long)floored;
    return true;
}

/* packed[i] = key * n + i for a kept point i, key = (iz * ny + iy) * nx + ix; nx * ny * nz * n + i
   for a dropped point (outside the range or the grid, or a non-finite channel). */
extern "C" __global__ void voxel_sort_keys(
        const Point* __restrict__ points, const long long n, const int channels,
        const float low_x, const float low_y, const float low_z,
        const float high_x, const float high_y, const float high_z,
        const float size_x, const float size_y, const float size_z,
        const long long nx, const long long ny, const long long nz,
        long long* __restrict__ packed) {
    GRID_STRIDE_LOOP(i, n) {
        const Point* point = points + i * channels;
        bool finite = true;
        for (int c = 0; c < channels; ++c) finite = finite && is_finite(load(point + c));
        long long ix, iy, iz;
        const bool kept = finite
            && axis_index(load(point), low_x, high_x, size_x, nx, &ix)
            && axis_index(load(point + 1), low_y, high_y, size_y, ny, &iy)
            && axis_index(load(point + 2), low_z, high_z, size_z, nz, &iz);
        const long long key = kept ? (iz * ny + iy) * nx + ix : nx * ny * nz;
        packed[i] = key * n + i;
    }
}

/* Over the sorted packed keys: is_first[row] = whether position j starts a voxel's group (row =
   the input row at j), sorted_position[row] = j where it does, and kept_points[0] = the number
   of kept points (written by the last kept position; left 0 when none is kept). */
extern "C" __global__ void mark_first_points(
        const long long* __restrict__ packed, const long long n, const long long dropped_key,
        bool* __restrict__ is_first, long long* __restrict__ sorted_position,
        long long* __restrict__ kept_points) {
    GRID_STRIDE_LOOP(j, n) {
        const long long key = packed[j] / n;
        const long long row = packed[j] - key * n;
        const bool kept = key < dropped_key;
        const bool first = kept && (j == 0 || packed[j - 1] / n != key);
        is_first[row] = first;
        if (first) sorted_position[row] = j;
        if (kept && (j + 1 == n || packed[j + 1] / n >= dropped_key)) kept_points[0] = j + 1;
    }
}

/* First position in (start, n) of sorted packed whose value is >= limit, n if none: doubling
   steps from start, then a binary search, so O(log group size) reads. */
__device__ __forceinline__ long long group_end(const long long* packed, long long n, long long start,
                                               long long limit) {
    long long low = start + 1, high = start + 1, step = 1;      // packed[start, low) < limit
    while (high < n && packed[high] < limit) {
        low = high + 1;
        step *= 2;
        high = start + step;
    }
    if (high > n) high = n;                                     // high == n or packed[high] >= limit
    while (low < high) {
        const long long middle = low + (high - low) / 2;
        if (packed[middle] < limit) low = middle + 1; else high = middle;
    }
    return low;
}

/* counter[0] += the sum of value over the warp (all 32 lanes must call). */
__device__ __forceinline__ void add_over_warp(long long* counter, long long value) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
    if ((threadIdx.x & 31) == 0) atomicAdd((unsigned long long*)counter, (unsigned long long)value);
}

/* Voxel v (first appearance order) of the first `voxels`: coords, point count and the fp16 mean of
   its first `capacity` points, summed like NumPy's zero-padded slot buffer. counters[1] += its
   points, counters[2] += the points used. */
extern "C" __global__ void voxel_means(
        const Point* __restrict__ points, const long long* __restrict__ packed,
        const long long* __restrict__ first_rows, const long long* __restrict__ sorted_position,
        const long long n, const int channels, const long long voxels, const int capacity,
        const long long nx, const long long ny,
        unsigned short* __restrict__ features, int* __restrict__ coords, int* __restrict__ point_count,
        long long* __restrict__ counters) {
    long long voxel_points = 0, used_points = 0;
    GRID_STRIDE_LOOP(v, voxels) {
        const long long first_row = first_rows[v];
        const long long start = sorted_position[first_row];
        const long long key = packed[start] / n;
        const long long size = group_end(packed, n, start, (key + 1) * n) - start;
        const int count = size < capacity ? (int)size : capacity;
        int* coord = coords + 4 * v;
        coord[0] = 0;
        coord[1] = (int)(key % nx);
        coord[2] = (int)((key / nx) % ny);
        coord[3] = (int)(key / (nx * ny));
        point_count[v] = count;
        const long long base = key * n;
        for (int c = 0; c < channels; ++c) {
            float sum = load(points + first_row * channels + c);
            for (int slot = 1; slot < capacity; ++slot) {
                const float value = slot < count
                    ? load(points + (packed[start + slot] - base) * channels + c) : 0.0f;
                sum = add_rn(sum, value);
            }
            features[v * channels + c] = to_half(div_rn(sum, (float)count));
        }
        voxel_points += size;
        used_points += count;
    }
    add_over_warp(counters + 1, voxel_points);
    add_over_warp(counters + 2, used_points);
}
"""


@lru_cache(maxsize=None)
def _kernel(name: str, point_type: str) -> Any:
    """Compiled (on first launch, cached by CuPy per device) RawKernel ``name`` for ``point_type``."""
    import cupy
    return cupy.RawKernel(_VOXELIZE_SOURCE.replace("POINT_TYPE", point_type), name)


def _launch(kernel: Any, threads: int, args: tuple) -> None:
    """Launch ``kernel`` for ``threads`` work items (grid-stride beyond ``_MAX_BLOCKS`` blocks);
    nothing to do for zero items."""
    if threads > 0:
        kernel((min(-(-threads // _BLOCK), _MAX_BLOCKS),), (_BLOCK,), args)


def _kernel_points(points: Any) -> Any:
    """C-contiguous CuPy float32 or float16 points (other dtypes cast to float32, as NumPy does)."""
    import cupy
    return cupy.ascontiguousarray(points, dtype=points.dtype if points.dtype in POINT_TYPES else np.float32)


def _no_voxels(channels: int, points_out_of_range: int) -> Voxels:
    """Zero voxels (empty CuPy arrays of the output shapes and dtypes)."""
    import cupy
    return Voxels(features=cupy.empty((0, channels), dtype=cupy.float16),
                  coords=cupy.empty((0, 4), dtype=cupy.int32), point_count=cupy.empty(0, dtype=cupy.int32),
                  points_out_of_range=points_out_of_range, points_over_capacity=0,
                  voxels_over_capacity=0, points_in_dropped_voxels=0)


def _sorted_keys(points: Any, config: VoxelizationConfig) -> Any:
    """Step 1: the sorted packed keys int64 [N] of ``points`` [N, C]."""
    import cupy
    count, channels = points.shape
    packed = cupy.empty(count, dtype=cupy.int64)
    bounds = (np.float32(value) for values in (config.point_range_min, config.point_range_max,
                                               config.voxel_size) for value in values)
    _launch(_kernel("voxel_sort_keys", POINT_TYPES[points.dtype]), count,
            (points, np.int64(count), np.int32(channels), *bounds,
             *(np.int64(cells) for cells in config.grid_size), packed))
    packed.sort()
    return packed


def _first_points(packed: Any, dropped_key: int) -> tuple[Any, Any, Any]:
    """Step 2: (first_rows int64 [V] ascending, sorted_position int64 [N] by input row, counters
    int64 [3] with counters[0] = kept points). Synchronises once (V)."""
    import cupy
    count = packed.shape[0]
    is_first = cupy.empty(count, dtype=cupy.bool_)
    sorted_position = cupy.empty(count, dtype=cupy.int64)
    counters = cupy.zeros(3, dtype=cupy.int64)
    _launch(_kernel("mark_first_points", "float"), count,        # reads no points: any point type
            (packed, np.int64(count), np.int64(dropped_key), is_first, sorted_position, counters))
    first_rows = cupy.flatnonzero(is_first).astype(cupy.int64, copy=False)
    return first_rows, sorted_position, counters


def voxelize_cuda(points: Any, config: VoxelizationConfig) -> Voxels:
    """CuPy points [N, C] (C >= 3, x y z first; float32 or float16, other dtypes cast to float32)
    -> :class:`Voxels` with CuPy arrays, bit-identical to the NumPy :func:`voxelize`.

    Synchronises for the voxel count and for the final counters (and inside CuPy's sort).
    """
    import cupy
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be [N, C] with C >= 3 (x, y, z first), got shape {points.shape}")
    points = _kernel_points(points)
    count, channels = points.shape
    nx, ny, nz = config.grid_size
    dropped_key = nx * ny * nz
    if (dropped_key + 1) * count > INT64_MAX:
        raise ValueError(f"{count} points on a {nx} x {ny} x {nz} grid overflow the int64 sort keys")
    if count == 0:
        return _no_voxels(channels, points_out_of_range=0)
    packed = _sorted_keys(points, config)
    first_rows, sorted_position, counters = _first_points(packed, dropped_key)
    voxel_count = int(first_rows.shape[0])
    if voxel_count == 0:
        return _no_voxels(channels, points_out_of_range=count)
    kept = min(voxel_count, config.max_voxels)
    features = cupy.empty((kept, channels), dtype=cupy.float16)
    coords = cupy.empty((kept, 4), dtype=cupy.int32)
    point_count = cupy.empty(kept, dtype=cupy.int32)
    _launch(_kernel("voxel_means", POINT_TYPES[points.dtype]), kept,
            (points, packed, first_rows, sorted_position, np.int64(count), np.int32(channels),
             np.int64(kept), np.int32(config.max_points_per_voxel), np.int64(nx), np.int64(ny),
             features, coords, point_count, counters))
    kept_points, voxel_points, used_points = (int(total) for total in counters.get())
    return Voxels(
        features=features,
        coords=coords,
        point_count=point_count,
        points_out_of_range=count - kept_points,
        points_over_capacity=voxel_points - used_points,
        voxels_over_capacity=voxel_count - kept,
        points_in_dropped_voxels=kept_points - voxel_points,
    )
