"""CUDA kernels of the lidar branch (CuPy RawKernels) where one launch replaces many array ops.

Imported only for CuPy inputs (``cupy`` itself is imported inside the functions, so importing this
module on a CPU machine is harmless). Each function is the GPU twin of a NumPy step in
:mod:`bevfusion_ros.lidar.sparse_conv` with identical integer results:

- :func:`reached_keys`: the output sites a strided conv reaches (NumPy: ``_reached_keys``);
- :func:`neighbor_map`: the rulebook's input row per (tap, output site) (NumPy: ``_neighbor_map``);
- :func:`gather_columns`: the im2col matrix that turns a sparse conv into one GEMM;
- :func:`sparse_conv_fp16`: the whole fp16 sparse conv in one launch (implicit GEMM on tensor
  cores, bias, optional residual and ReLU fused), the GPU fast path of ``sparse_conv``.

Coordinates are int32 (x, y, z) rows, keys int64 (x * Y + y) * Z + z, taps in the C order of
weight[kx, ky, kz]; flat thread indices are 64-bit (grid-stride loops), so sizes are only bounded
by memory. Kernels run on the current CuPy stream.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

Triple = tuple[int, int, int]
_BLOCK = 256
_MAX_BLOCKS = 1 << 16            # grid-stride loops cover the rest
_ROW_BLOCK = 128                 # gather_columns: threads along one output row

_COMMON = r"""
#define GRID_STRIDE_LOOP(index, total) \
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < (total); \
         index += (long long)blockDim.x * gridDim.x)

/* Tap t of a kernel (kx, ky, kz), C order, as its per-axis offsets. */
__device__ __forceinline__ void tap_offsets(long long t, int ky, int kz, int* tx, int* ty, int* tz) {
    *tz = (int)(t % kz);
    *ty = (int)((t / kz) % ky);
    *tx = (int)(t / ((long long)ky * kz));
}
"""

_REACHED = _COMMON + r"""
/* Output coordinate reached from input coordinate c through tap offset t on one axis, or -1. */
__device__ __forceinline__ long long reach(int c, int t, int stride, int padding, int size) {
    const long long shifted = (long long)c + padding - t;
    if (shifted < 0 || shifted % stride != 0) return -1;
    const long long o = shifted / stride;
    return o < size ? o : -1;
}

/* occupied[key] = 1 for every output site that some input site reaches through some tap.
   Thread = (tap, input row); several threads may store 1 to one byte, which is benign. */
extern "C" __global__ void mark_reached(
        const int* coords, const long long n_in,
        const int kx, const int ky, const int kz,
        const int sx, const int sy, const int sz,
        const int px, const int py, const int pz,
        const int out_x, const int out_y, const int out_z,
        unsigned char* occupied) {
    GRID_STRIDE_LOOP(index, (long long)kx * ky * kz * n_in) {
        const long long t = index / n_in;
        const long long i = index - t * n_in;
        int tx, ty, tz;
        tap_offsets(t, ky, kz, &tx, &ty, &tz);
        const long long x = reach(coords[3 * i], tx, sx, px, out_x);
        const long long y = reach(coords[3 * i + 1], ty, sy, py, out_y);
        const long long z = reach(coords[3 * i + 2], tz, sz, pz, out_z);
        if (x >= 0 && y >= 0 && z >= 0) occupied[(x * out_y + y) * out_z + z] = 1;
    }
}
"""

_NEIGHBORS = _COMMON + r"""
/* First position in sorted keys[0, n) whose key is >= key (n if none). */
__device__ __forceinline__ long long lower_bound(const long long* keys, long long n, long long key) {
    long long low = 0, high = n;
    while (low < high) {
        const long long middle = low + (high - low) / 2;
        if (keys[middle] < key) low = middle + 1; else high = middle;
    }
    return low;
}

/* neighbors[t, o] = row of input site out_coords[o] * s - p + tap t (per axis), n_in if inactive.
   Thread = (tap, output row), so the [K, n_out] stores are coalesced. */
extern "C" __global__ void neighbor_map(
        const int* out_coords, const long long n_out,
        const long long* sorted_keys, const long long* rows, const long long n_in,
        const int kx, const int ky, const int kz,
        const int sx, const int sy, const int sz,
        const int px, const int py, const int pz,
        const int in_x, const int in_y, const int in_z,
        int* neighbors) {
    GRID_STRIDE_LOOP(index, (long long)kx * ky * kz * n_out) {
        const long long t = index / n_out;
        const long long o = index - t * n_out;
        int tx, ty, tz;
        tap_offsets(t, ky, kz, &tx, &ty, &tz);
        const long long x = (long long)out_coords[3 * o] * sx - px + tx;
        const long long y = (long long)out_coords[3 * o + 1] * sy - py + ty;
        const long long z = (long long)out_coords[3 * o + 2] * sz - pz + tz;
        int row = (int)n_in;
        if (x >= 0 && x < in_x && y >= 0 && y < in_y && z >= 0 && z < in_z) {
            const long long key = (x * in_y + y) * in_z + z;
            const long long at = lower_bound(sorted_keys, n_in, key);
            if (at < n_in && sorted_keys[at] == key) row = (int)rows[at];
        }
        neighbors[index] = row;
    }
}
"""

# Copies raw elements (ELEMENT = an unsigned integer of the feature itemsize), so one kernel
# serves float16 and float32 features; a missing neighbour gives all-zero bits = +0.0.
_GATHER = r"""
/* columns[o, t * channels + c] = features[neighbors[t, o], c], or 0 where neighbors[t, o] >= n_in.
   One block per output row (grid-stride over rows), threads along the row: coalesced stores. */
extern "C" __global__ void gather_columns(
        const ELEMENT* features, const int* neighbors,
        const int n_in, const long long n_out, const int taps, const int channels,
        ELEMENT* columns) {
    const int width = taps * channels;
    for (long long o = blockIdx.x; o < n_out; o += gridDim.x) {
        ELEMENT* out_row = columns + o * width;
        for (int column = threadIdx.x; column < width; column += blockDim.x) {
            const int t = column / channels;
            const int row = neighbors[(long long)t * n_out + o];
            out_row[column] = row < n_in
                ? features[(long long)row * channels + (column - t * channels)] : (ELEMENT)0;
        }
    }
}
"""
_ELEMENT_TYPES = {2: "unsigned short", 4: "unsigned int", 8: "unsigned long long"}

# Implicit-GEMM sparse convolution on tensor cores (WMMA 16x16x16, fp16 in, float32 accumulate).
# A block owns TILE_ROWS = 16 * WARPS consecutive output rows and all OUT_CHANNELS columns; warp w
# the rows 16w..16w+15. Per tap it reads the rows' neighbour indices; a tap without any neighbour
# in the tile is skipped. Per 16-channel slice of the input it stages the gathered feature rows
# A [TILE_ROWS, 16] (zeros for missing neighbours or channels past channels_in) and the weight
# slice B [16, OUT_CHANNELS] in shared memory, and every warp multiplies its 16 rows into
# OUT_CHANNELS / 16 accumulator fragments. Epilogue: accumulators -> shared memory -> + bias
# (+ residual) (ReLU) in float32 -> one round to fp16. VECTOR = 1 (channels_in % 16 == 0) moves
# A and B in 16-byte loads; VECTOR = 0 element by element (e.g. the 5-channel input layer).
_SPARSE_CONV_FP16 = r"""
#include <cuda_fp16.h>
#include <mma.h>
using namespace nvcuda;

#define TILE_ROWS (16 * WARPS)
#define THREADS (32 * WARPS)

extern "C" __global__ void __launch_bounds__(THREADS) sparse_conv_fp16(
        const __half* __restrict__ features,    /* [n_in, channels_in] */
        const __half* __restrict__ weight,      /* [taps, channels_in, OUT_CHANNELS] */
        const int* __restrict__ neighbors,      /* [taps, n_out], n_in = no neighbour */
        const __half* __restrict__ bias,        /* [OUT_CHANNELS] */
        const __half* __restrict__ residual,    /* [n_out, OUT_CHANNELS] or null */
        __half* __restrict__ out,               /* [n_out, OUT_CHANNELS] */
        const int n_in, const int n_out, const int channels_in, const int taps, const int relu) {
    __shared__ __align__(32) __half a_tile[TILE_ROWS * 16];
    __shared__ __align__(32) __half b_tile[16 * OUT_CHANNELS];
    __shared__ __align__(32) float c_tile[TILE_ROWS * OUT_CHANNELS];
    __shared__ int source_rows[TILE_ROWS];
    const int warp = threadIdx.x >> 5;
    const long long row0 = (long long)blockIdx.x * TILE_ROWS;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[OUT_CHANNELS / 16];
#pragma unroll
    for (int j = 0; j < OUT_CHANNELS / 16; ++j) wmma::fill_fragment(acc[j], 0.0f);

    for (int t = 0; t < taps; ++t) {
        int has_neighbor = 0;
        if (threadIdx.x < TILE_ROWS) {
            const long long o = row0 + threadIdx.x;
            const int source = o < n_out ? neighbors[(long long)t * n_out + o] : n_in;
            source_rows[threadIdx.x] = source;
            has_neighbor = source < n_in;
        }
        if (!__syncthreads_or(has_neighbor)) continue;          /* uniform across the block */
        for (int c0 = 0; c0 < channels_in; c0 += 16) {
#if VECTOR
            for (int i = threadIdx.x; i < TILE_ROWS * 2; i += THREADS) {
                const int r = i >> 1, part = (i & 1) * 8;
                const int source = source_rows[r];
                uint4 value = make_uint4(0u, 0u, 0u, 0u);
                if (source < n_in)
                    value = *reinterpret_cast<const uint4*>(features + (long long)source * channels_in + c0 + part);
                *reinterpret_cast<uint4*>(a_tile + r * 16 + part) = value;
            }
            for (int i = threadIdx.x; i < 2 * OUT_CHANNELS; i += THREADS) {
                const int k = i / (OUT_CHANNELS / 8), n = (i % (OUT_CHANNELS / 8)) * 8;
                *reinterpret_cast<uint4*>(b_tile + k * OUT_CHANNELS + n) = *reinterpret_cast<const uint4*>(
                    weight + ((long long)t * channels_in + c0 + k) * OUT_CHANNELS + n);
            }
#else
            for (int i = threadIdx.x; i < TILE_ROWS * 16; i += THREADS) {
                const int r = i >> 4, c = c0 + (i & 15);
                const int source = source_rows[r];
                a_tile[i] = (source < n_in && c < channels_in)
                    ? features[(long long)source * channels_in + c] : __float2half(0.0f);
            }
            for (int i = threadIdx.x; i < 16 * OUT_CHANNELS; i += THREADS) {
                const int c = c0 + i / OUT_CHANNELS;
                b_tile[i] = c < channels_in
                    ? weight[((long long)t * channels_in + c) * OUT_CHANNELS + i % OUT_CHANNELS]
                    : __float2half(0.0f);
            }
#endif
            __syncthreads();
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
            wmma::load_matrix_sync(a, a_tile + warp * 16 * 16, 16);
#pragma unroll
            for (int j = 0; j < OUT_CHANNELS / 16; ++j) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
                wmma::load_matrix_sync(b, b_tile + j * 16, OUT_CHANNELS);
                wmma::mma_sync(acc[j], a, b, acc[j]);
            }
            __syncthreads();
        }
    }
#pragma unroll
    for (int j = 0; j < OUT_CHANNELS / 16; ++j)
        wmma::store_matrix_sync(c_tile + warp * 16 * OUT_CHANNELS + j * 16, acc[j], OUT_CHANNELS,
                                wmma::mem_row_major);
    __syncthreads();
    for (int i = threadIdx.x; i < TILE_ROWS * OUT_CHANNELS; i += THREADS) {
        const int r = i / OUT_CHANNELS, n = i % OUT_CHANNELS;
        const long long o = row0 + r;
        if (o < n_out) {
            float value = c_tile[i] + __half2float(bias[n]);
            if (residual != nullptr) value += __half2float(residual[o * OUT_CHANNELS + n]);
            if (relu) value = fmaxf(value, 0.0f);
            out[o * OUT_CHANNELS + n] = __float2half_rn(value);
        }
    }
}
"""
_CONV_WARPS = 4


@lru_cache(maxsize=None)
def _kernel(source: str, name: str) -> Any:
    """Compiled (on first launch, cached by CuPy per device) RawKernel ``name`` of ``source``."""
    import cupy
    return cupy.RawKernel(source, name)


@lru_cache(maxsize=None)
def _sparse_conv_kernel(out_channels: int, vector: bool) -> Any:
    """The compiled fp16 implicit-GEMM conv for ``out_channels`` (a multiple of 16)."""
    import cupy
    options = (f"-DOUT_CHANNELS={out_channels}", f"-DWARPS={_CONV_WARPS}", f"-DVECTOR={int(vector)}",
               "--std=c++17")
    return cupy.RawModule(code=_SPARSE_CONV_FP16, options=options).get_function("sparse_conv_fp16")


def _launch(kernel: Any, threads: int, args: tuple, block: int = _BLOCK) -> None:
    """Launch ``kernel`` with enough blocks of ``block`` threads for ``threads`` work items
    (grid-stride beyond ``_MAX_BLOCKS`` blocks); nothing to do for zero items."""
    if threads > 0:
        kernel((min(-(-threads // block), _MAX_BLOCKS),), (block,), args)


def _int32s(*triples: Triple) -> tuple[np.int32, ...]:
    return tuple(np.int32(value) for triple in triples for value in triple)


def reached_keys(coords: Any, kernel_size: Triple, stride: Triple, padding: Triple,
                 output_shape: Triple) -> Any:
    """Keys int64 [M] (ascending, unique) of the output sites that the input sites ``coords``
    int32 [N, 3] reach through some tap. Uses an occupancy byte per output cell
    (prod(output_shape) bytes, e.g. 10.9 MB for 720 x 720 x 21) instead of a sort."""
    import cupy
    coords = cupy.ascontiguousarray(coords, dtype=cupy.int32)
    occupied = cupy.zeros(math.prod(output_shape), dtype=cupy.uint8)
    n_in = int(coords.shape[0])
    _launch(_kernel(_REACHED, "mark_reached"), math.prod(kernel_size) * n_in,
            (coords, np.int64(n_in), *_int32s(kernel_size, stride, padding, output_shape), occupied))
    return cupy.flatnonzero(occupied)


def neighbor_map(out_coords: Any, sorted_keys: Any, rows: Any, kernel_size: Triple, stride: Triple,
                 padding: Triple, input_shape: Triple) -> Any:
    """Neighbour map int32 [K, N_out] of the output sites ``out_coords`` int32 [N_out, 3] over the
    input sites given by their ascending keys ``sorted_keys`` int64 [N_in] and rows int64 [N_in]
    (N_in where a neighbour is inactive or off the grid ``input_shape``)."""
    import cupy
    out_coords = cupy.ascontiguousarray(out_coords, dtype=cupy.int32)
    sorted_keys = cupy.ascontiguousarray(sorted_keys, dtype=cupy.int64)
    rows = cupy.ascontiguousarray(rows, dtype=cupy.int64)
    n_out, n_in = int(out_coords.shape[0]), int(sorted_keys.shape[0])
    if n_in >= np.iinfo(np.int32).max:
        raise ValueError(f"{n_in} input sites do not fit the int32 neighbour map")
    taps = math.prod(kernel_size)
    neighbors = cupy.empty((taps, n_out), dtype=cupy.int32)
    _launch(_kernel(_NEIGHBORS, "neighbor_map"), taps * n_out,
            (out_coords, np.int64(n_out), sorted_keys, rows, np.int64(n_in),
             *_int32s(kernel_size, stride, padding, input_shape), neighbors))
    return neighbors


def gather_columns(features: Any, neighbors: Any) -> Any:
    """im2col: features [N_in, C] (any 2-, 4- or 8-byte dtype), neighbour map int32 [K, N_out]
    (N_in = no neighbour) -> columns [N_out, K * C] of the features' dtype, tap-major then channel
    (the row order of weight[kx, ky, kz, I, O] reshaped to [K * I, O]), zeros for no neighbour."""
    import cupy
    features = cupy.ascontiguousarray(features)
    neighbors = cupy.ascontiguousarray(neighbors, dtype=cupy.int32)
    (n_in, channels), (taps, n_out) = features.shape, neighbors.shape
    if features.itemsize not in _ELEMENT_TYPES:
        raise TypeError(f"gather_columns: unsupported feature dtype {features.dtype}")
    if taps * channels >= np.iinfo(np.int32).max or n_in >= np.iinfo(np.int32).max:
        raise ValueError(f"gather_columns: {n_in} x {channels} features with {taps} taps exceed int32")
    columns = cupy.empty((n_out, taps * channels), dtype=features.dtype)
    source = _GATHER.replace("ELEMENT", _ELEMENT_TYPES[features.itemsize])
    _launch(_kernel(source, "gather_columns"), n_out * _ROW_BLOCK,     # one block per output row
            (features, neighbors, np.int32(n_in), np.int64(n_out), np.int32(taps),
             np.int32(channels), columns), block=_ROW_BLOCK)
    return columns


def fused_conv_supported(channels_out: int) -> bool:
    """Whether :func:`sparse_conv_fp16` handles ``channels_out`` output channels (multiples of 16
    up to 128: the accumulators of 128 columns fill a warp's registers)."""
    return channels_out % 16 == 0 and 16 <= channels_out <= 128


def sparse_conv_fp16(features: Any, tap_weights: Any, neighbors: Any, bias: Any,
                     residual: Any = None, relu: bool = False) -> Any:
    """One fp16 sparse convolution: act(sum over taps of features[nb] @ W[tap] + bias (+ residual)).

    features fp16 [N_in, I]; tap_weights fp16 [K, I, O] (O: see :func:`fused_conv_supported`);
    neighbors int32 [K, N_out] (N_in = none); bias fp16 [O]; residual fp16 [N_out, O] or None;
    ``relu`` applies max(., 0) last. Products and sums in float32 on tensor cores, one rounding
    to fp16 at the end. Returns fp16 [N_out, O].
    """
    import cupy
    features = cupy.ascontiguousarray(features, dtype=cupy.float16)
    tap_weights = cupy.ascontiguousarray(tap_weights, dtype=cupy.float16)
    neighbors = cupy.ascontiguousarray(neighbors, dtype=cupy.int32)
    bias = cupy.ascontiguousarray(bias, dtype=cupy.float16)
    (n_in, channels_in), (taps, n_out) = features.shape, neighbors.shape
    channels_out = int(tap_weights.shape[2])
    if not fused_conv_supported(channels_out) or tap_weights.shape[:2] != (taps, channels_in):
        raise ValueError(f"sparse_conv_fp16: weight {tap_weights.shape} does not fit {taps} taps x "
                         f"{channels_in} channels, or {channels_out} outputs are unsupported")
    out = cupy.empty((n_out, channels_out), dtype=cupy.float16)
    if residual is not None:
        residual = cupy.ascontiguousarray(residual, dtype=cupy.float16)
        if residual.shape != out.shape:
            raise ValueError(f"sparse_conv_fp16: residual {residual.shape} != output {out.shape}")
    if n_out == 0:
        return out
    rows_per_block = 16 * _CONV_WARPS
    kernel = _sparse_conv_kernel(channels_out, channels_in % 16 == 0)
    kernel((-(-n_out // rows_per_block),), (32 * _CONV_WARPS,),
           (features, tap_weights, neighbors, bias,
            residual if residual is not None else np.uint64(0), out,      # uint64 0: a null pointer
            np.int32(n_in), np.int32(n_out), np.int32(channels_in), np.int32(taps), np.int32(relu)))
    return out
