"""CUDA kernels of the lidar branch (CuPy RawKernels) where one launch replaces many array ops.

Imported only for CuPy inputs (``cupy`` itself is imported inside the functions, so importing this
module on a CPU machine is harmless). Each function is the GPU twin of a NumPy step in
:mod:`bevfusion_ros.lidar.sparse_conv` with identical integer results:

- :class:`SiteHash`: key -> row of a set of sites, a hash table (NumPy: ``SiteTable``, sorted);
- :func:`reached_sites`: the output sites a strided conv reaches (NumPy: ``_reached_sites``);
- :func:`neighbor_map`: the rulebook's input row per (tap, output site) (NumPy: ``_neighbor_map``);
- :func:`gather_columns`: the im2col matrix that turns a sparse conv into one GEMM;
- :func:`pack_conv_weight`: a conv weight in the layout of the fp16 tensor-core kernel
  (:mod:`bevfusion_ros.lidar._conv_fp16`, the GPU fast path of ``sparse_conv``).

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

_HASH = r"""
/* Site table: open addressing with linear probing over 2**log2_capacity slots (at least twice
   the sites, so a probe always meets an empty slot); slot_keys holds a site's key or EMPTY_KEY,
   slot_rows its row. Keys are >= 0, so all-ones bits mark an empty slot. */
#define EMPTY_KEY 0xffffffffffffffffull

__device__ __forceinline__ unsigned long long first_slot(long long key, int log2_capacity) {
    return ((unsigned long long)key * 0x9E3779B97F4A7C15ull) >> (64 - log2_capacity);   /* Fibonacci */
}

/* Row of the site with ``key``, or ``missing`` when no site has it. */
__device__ __forceinline__ int find_row(const unsigned long long* __restrict__ slot_keys,
                                        const int* __restrict__ slot_rows, int log2_capacity,
                                        long long key, int missing) {
    const unsigned long long mask = (1ull << log2_capacity) - 1;
    for (unsigned long long slot = first_slot(key, log2_capacity);; slot = (slot + 1) & mask) {
        const unsigned long long stored = slot_keys[slot];
        if (stored == (unsigned long long)key) return slot_rows[slot];
        if (stored == EMPTY_KEY) return missing;
    }
}
"""

_INSERT = _COMMON + _HASH + r"""
/* Insert the sites coords[i] (unique) with row i: thread per site, atomicCAS claims a slot. */
extern "C" __global__ void insert_sites(
        const int* coords, const long long n, const int size_y, const int size_z,
        unsigned long long* slot_keys, int* slot_rows, const int log2_capacity) {
    const unsigned long long mask = (1ull << log2_capacity) - 1;
    GRID_STRIDE_LOOP(i, n) {
        const long long key = ((long long)coords[3 * i] * size_y + coords[3 * i + 1]) * size_z + coords[3 * i + 2];
        for (unsigned long long slot = first_slot(key, log2_capacity);; slot = (slot + 1) & mask) {
            const unsigned long long stored = atomicCAS(slot_keys + slot, EMPTY_KEY, (unsigned long long)key);
            if (stored == EMPTY_KEY) { slot_rows[slot] = (int)i; break; }
        }
    }
}
"""

_NEIGHBORS = _COMMON + _HASH + r"""
/* neighbors[t, o] = row of input site out_coords[o] * s - p + tap t (per axis), n_in if inactive.
   Thread = (tap, output row), so the [K, n_out] stores are coalesced. */
extern "C" __global__ void neighbor_map(
        const int* out_coords, const long long n_out,
        const unsigned long long* slot_keys, const int* slot_rows, const int log2_capacity,
        const int n_in,
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
        int row = n_in;
        if (x >= 0 && x < in_x && y >= 0 && y < in_y && z >= 0 && z < in_z)
            row = find_row(slot_keys, slot_rows, log2_capacity, (x * in_y + y) * in_z + z, n_in);
        neighbors[index] = row;
    }
}
"""

# Stream compaction of an occupancy grid in ascending cell order, in two launches and without a
# scan library: block b owns CELLS_PER_BLOCK consecutive cells, thread t 16 of them; the first
# launch counts each block's occupied cells, the second re-counts, adds the counts of blocks
# 0..b-1 (a few thousand integers, summed by each block) and writes the cells' coordinates.
_CELLS_PER_THREAD = 16
_COMPACT_THREADS = 256
_CELLS_PER_BLOCK = _CELLS_PER_THREAD * _COMPACT_THREADS
_COMPACT = f"""
#define CELLS_PER_THREAD {_CELLS_PER_THREAD}
#define COMPACT_THREADS {_COMPACT_THREADS}
""" + r"""
#define CELLS_PER_BLOCK (CELLS_PER_THREAD * COMPACT_THREADS)

/* flags[i] = occupied[first + i] (0 past the grid); returns their sum. */
__device__ __forceinline__ int thread_cells(const unsigned char* occupied, long long cells,
                                            long long first, unsigned char* flags) {
    int count = 0;
#pragma unroll
    for (int i = 0; i < CELLS_PER_THREAD; ++i) {
        flags[i] = first + i < cells ? occupied[first + i] : (unsigned char)0;
        count += flags[i];
    }
    return count;
}

/* Exclusive prefix sum of ``value`` over the block's threads (Hillis-Steele in shared memory);
   *total = the block's sum. Every thread of the block must call it. */
__device__ int block_exclusive_scan(int value, int* total) {
    __shared__ int scratch[COMPACT_THREADS];
    scratch[threadIdx.x] = value;
    __syncthreads();
    for (int offset = 1; offset < COMPACT_THREADS; offset <<= 1) {
        const int add = threadIdx.x >= offset ? scratch[threadIdx.x - offset] : 0;
        __syncthreads();
        scratch[threadIdx.x] += add;
        __syncthreads();
    }
    *total = scratch[COMPACT_THREADS - 1];
    const int inclusive = scratch[threadIdx.x];
    __syncthreads();
    return inclusive - value;
}

extern "C" __global__ void __launch_bounds__(COMPACT_THREADS) count_occupied(
        const unsigned char* occupied, const long long cells, int* block_counts) {
    unsigned char flags[CELLS_PER_THREAD];
    const long long first = (long long)blockIdx.x * CELLS_PER_BLOCK + (long long)threadIdx.x * CELLS_PER_THREAD;
    int total;
    block_exclusive_scan(thread_cells(occupied, cells, first, flags), &total);
    if (threadIdx.x == 0) block_counts[blockIdx.x] = total;
}

/* sites[k] = (x, y, z) of the k-th occupied cell (cell = (x * size_y + y) * size_z + z);
   *site_count = the number of occupied cells (written by the last block). */
extern "C" __global__ void __launch_bounds__(COMPACT_THREADS) write_occupied(
        const unsigned char* occupied, const long long cells, const int* block_counts,
        const int size_y, const int size_z, int* sites, long long* site_count) {
    int before = 0;
    for (int b = threadIdx.x; b < (int)blockIdx.x; b += COMPACT_THREADS) before += block_counts[b];
    int base;
    block_exclusive_scan(before, &base);
    unsigned char flags[CELLS_PER_THREAD];
    const long long first = (long long)blockIdx.x * CELLS_PER_BLOCK + (long long)threadIdx.x * CELLS_PER_THREAD;
    int block_total;
    long long out = (long long)base + block_exclusive_scan(thread_cells(occupied, cells, first, flags), &block_total);
#pragma unroll
    for (int i = 0; i < CELLS_PER_THREAD; ++i) {
        if (!flags[i]) continue;
        const long long cell = first + i;
        sites[3 * out] = (int)(cell / ((long long)size_y * size_z));
        sites[3 * out + 1] = (int)((cell / size_z) % size_y);
        sites[3 * out + 2] = (int)(cell % size_z);
        ++out;
    }
    if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) *site_count = (long long)base + block_total;
}
"""

# The GPU half of scn.sparse_input: keys and range checks of voxel coordinates (0, x, y, z), then,
# after an argsort of the keys, the sites gathered in key order with duplicates counted.
_SITES = _COMMON + r"""
/* keys[i] = (x * size_y + y) * size_z + z of coords[i] = (batch, x, y, z); counts[0] += rows with
   batch != 0, counts[1] += rows outside the grid (their key is not used). */
extern "C" __global__ void site_keys(const int* coords, const long long n, const int size_x,
                                     const int size_y, const int size_z, long long* keys,
                                     unsigned long long* counts) {
    GRID_STRIDE_LOOP(i, n) {
        const int x = coords[4 * i + 1], y = coords[4 * i + 2], z = coords[4 * i + 3];
        if (coords[4 * i] != 0) atomicAdd(counts, 1ull);
        if (x < 0 || x >= size_x || y < 0 || y >= size_y || z < 0 || z >= size_z) atomicAdd(counts + 1, 1ull);
        keys[i] = ((long long)x * size_y + y) * size_z + z;
    }
}

/* xyz[j] = coords[order[j]][1:4]; counts[2] += j with keys[order[j]] == keys[order[j - 1]]. */
extern "C" __global__ void gather_sites(const long long* order, const long long* keys, const int* coords,
                                        const long long n, int* xyz, unsigned long long* counts) {
    GRID_STRIDE_LOOP(j, n) {
        const long long row = order[j];
        xyz[3 * j] = coords[4 * row + 1];
        xyz[3 * j + 1] = coords[4 * row + 2];
        xyz[3 * j + 2] = coords[4 * row + 3];
        if (j > 0 && keys[row] == keys[order[j - 1]]) atomicAdd(counts + 2, 1ull);
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



@lru_cache(maxsize=None)
def _kernel(source: str, name: str) -> Any:
    """Compiled (on first launch, cached by CuPy per device) RawKernel ``name`` of ``source``."""
    import cupy
    return cupy.RawKernel(source, name)


def _launch(kernel: Any, threads: int, args: tuple, block: int = _BLOCK) -> None:
    """Launch ``kernel`` with enough blocks of ``block`` threads for ``threads`` work items
    (grid-stride beyond ``_MAX_BLOCKS`` blocks); nothing to do for zero items."""
    if threads > 0:
        kernel((min(-(-threads // block), _MAX_BLOCKS),), (block,), args)


class SiteHash:
    """GPU table of N unique sites int32 [N, 3] on ``spatial_shape``: key -> row in one probe or
    two (open addressing, linear probing, at least twice as many slots as sites).

    The GPU counterpart of the NumPy ``SiteTable`` (sorted keys + binary search): same answers,
    built in one launch without a sort, so the rulebooks of a frame need no host round trip
    except the count of a strided conv's output sites. ``slot_keys`` int64 [S] (-1 = empty),
    ``slot_rows`` int32 [S], S = 2**``log2_capacity``.
    """

    def __init__(self, coords: Any, spatial_shape: Triple):
        import cupy
        coords = cupy.ascontiguousarray(coords, dtype=cupy.int32)
        self.size = int(coords.shape[0])
        if self.size >= np.iinfo(np.int32).max:
            raise ValueError(f"{self.size} sites do not fit the int32 rows of the site table")
        self.spatial_shape = tuple(spatial_shape)
        self.log2_capacity = max(6, (2 * self.size - 1).bit_length())
        self.slot_keys = cupy.full(1 << self.log2_capacity, -1, dtype=cupy.int64)
        self.slot_rows = cupy.empty(1 << self.log2_capacity, dtype=cupy.int32)
        _launch(_kernel(_INSERT, "insert_sites"), self.size,
                (coords, np.int64(self.size), *_int32s(spatial_shape[1:]), self.slot_keys,
                 self.slot_rows, np.int32(self.log2_capacity)))


def _int32s(*values: tuple[int, ...]) -> tuple[np.int32, ...]:
    return tuple(np.int32(value) for group in values for value in group)


def reached_sites(coords: Any, kernel_size: Triple, stride: Triple, padding: Triple,
                  output_shape: Triple) -> Any:
    """The output sites int32 [M, 3] (ascending key order) that the input sites ``coords`` int32
    [N, 3] reach through some tap: an occupancy byte per output cell (prod(output_shape) bytes,
    e.g. 10.9 MB for 720 x 720 x 21) marked, then compacted in cell order (no sort). Reading M
    back is the one host synchronisation of a strided rulebook."""
    import cupy
    coords = cupy.ascontiguousarray(coords, dtype=cupy.int32)
    cells = math.prod(output_shape)
    if cells >= np.iinfo(np.int32).max:
        raise ValueError(f"output grid {output_shape} has too many cells for the occupancy grid")
    occupied = cupy.zeros(cells, dtype=cupy.uint8)
    n_in = int(coords.shape[0])
    _launch(_kernel(_REACHED, "mark_reached"), math.prod(kernel_size) * n_in,
            (coords, np.int64(n_in), *_int32s(kernel_size, stride, padding, output_shape), occupied))
    blocks = -(-cells // _CELLS_PER_BLOCK)
    block_counts = cupy.empty(blocks, dtype=cupy.int32)
    sites = cupy.empty((min(cells, math.prod(kernel_size) * n_in), 3), dtype=cupy.int32)
    site_count = cupy.empty(1, dtype=cupy.int64)
    _kernel(_COMPACT, "count_occupied")((blocks,), (_COMPACT_THREADS,), (occupied, np.int64(cells), block_counts))
    _kernel(_COMPACT, "write_occupied")((blocks,), (_COMPACT_THREADS,), (
        occupied, np.int64(cells), block_counts, *_int32s(output_shape[1:]), sites, site_count))
    return sites[:int(site_count.get()[0])]


def sorted_sites(features: Any, coords: Any, spatial_shape: Triple) -> tuple[Any, Any, np.ndarray]:
    """Voxel features [M, C] and coords int [M, 4] (batch, x, y, z) -> (features [M, C], xyz
    int32 [M, 3]) in ascending key order, and host int64 [3]: rows with batch != 0, rows outside
    ``spatial_shape``, duplicate sites (one device-to-host copy)."""
    import cupy
    coords = cupy.ascontiguousarray(coords, dtype=cupy.int32)
    count = int(coords.shape[0])
    counts = cupy.zeros(3, dtype=cupy.uint64)
    keys = cupy.empty(count, dtype=cupy.int64)
    _launch(_kernel(_SITES, "site_keys"), count,
            (coords, np.int64(count), *_int32s(spatial_shape), keys, counts))
    order = keys.argsort()
    xyz = cupy.empty((count, 3), dtype=cupy.int32)
    _launch(_kernel(_SITES, "gather_sites"), count, (order, keys, coords, np.int64(count), xyz, counts))
    return features[order], xyz, counts.get().astype(np.int64)


def neighbor_map(out_coords: Any, table: SiteHash, kernel_size: Triple, stride: Triple,
                 padding: Triple) -> Any:
    """Neighbour map int32 [K, N_out] of the output sites ``out_coords`` int32 [N_out, 3] over the
    input sites of ``table`` (``table.size`` where a neighbour is inactive or off its grid)."""
    import cupy
    out_coords = cupy.ascontiguousarray(out_coords, dtype=cupy.int32)
    n_out = int(out_coords.shape[0])
    taps = math.prod(kernel_size)
    neighbors = cupy.empty((taps, n_out), dtype=cupy.int32)
    _launch(_kernel(_NEIGHBORS, "neighbor_map"), taps * n_out,
            (out_coords, np.int64(n_out), table.slot_keys, table.slot_rows,
             np.int32(table.log2_capacity), np.int32(table.size),
             *_int32s(kernel_size, stride, padding, table.spatial_shape), neighbors))
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
    """Whether the fp16 kernel (:mod:`bevfusion_ros.lidar._conv_fp16`) handles ``channels_out``
    output channels on this GPU
    (multiples of 16 up to 128: 128 columns of accumulators fill a warp's registers; tensor-core
    ``mma.sync`` m16n8k16 needs compute capability 8.0 or newer)."""
    import cupy
    return (channels_out % 16 == 0 and 16 <= channels_out <= 128
            and _compute_capability(cupy.cuda.Device().id) >= 80)


@lru_cache(maxsize=None)
def _compute_capability(device: int) -> int:
    """e.g. 90 for an H100 (cached: the query costs a driver call per conv otherwise)."""
    import cupy
    return int(cupy.cuda.Device(device).compute_capability)


def pack_conv_weight(tap_weights: Any) -> Any:
    """fp16 [K, I, O] -> the kernel's layout fp16 [K, O, I_pad]: transposed, input channels
    zero-padded to a multiple of 16. Do it once per layer (the runner keeps the result)."""
    import cupy
    taps, channels_in, channels_out = tap_weights.shape
    packed = cupy.zeros((taps, channels_out, -(-channels_in // 16) * 16), dtype=cupy.float16)
    packed[:, :, :channels_in] = cupy.asarray(tap_weights, dtype=cupy.float16).transpose(0, 2, 1)
    return packed
