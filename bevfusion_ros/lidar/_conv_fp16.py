"""Tiled, software-pipelined fp16 sparse convolution on tensor cores (CuPy RawModule, sm_80+).

:func:`sparse_conv_fp16_tiled` computes what :func:`bevfusion_ros.lidar._cuda.sparse_conv_fp16`
computes (same arguments and packed weight; the same fp16 bits are expected, which the GPU tests
check to within 1 ulp) with a faster schedule: warps split the tile along rows and columns, and
stages of several k-steps are copied with ``cp.async`` into a ring of shared-memory buffers. The
schedule and its shared memory: docs/pipeline.md, "fp16 sparse convolution kernel".

Like ``_cuda``, ``cupy`` is imported inside the functions only: this module imports on machines
without CuPy.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np

# Layouts (fp16 values are handled as raw ``unsigned short`` bits):
#   features  fp16 [n_in, channels_in], row-major;
#   weight    fp16 [taps, OUT_CHANNELS, channels_pad] (``pack_conv_weight``: W[t] transposed, input
#             channels zero-padded to channels_pad = channels_in rounded up to 16);
#   neighbors int32 [taps, n_out], n_in = no neighbour;
#   bias fp16 [OUT_CHANNELS]; residual fp16 [n_out, OUT_CHANNELS] or null; out fp16 [n_out, OUT_CHANNELS].
#
# Tiling (compile-time: OUT_CHANNELS, TILE_ROWS, WARPS_M, WARPS_N, STAGE_CHANNELS, STAGES,
# MIN_BLOCKS, VECTOR): block b owns output rows [b * TILE_ROWS, (b + 1) * TILE_ROWS) and all
# OUT_CHANNELS columns. Warp w = wm * WARPS_N + wn owns rows wm * WARP_ROWS + [0, WARP_ROWS) and
# columns wn * WARP_COLS + [0, WARP_COLS) of that tile as M_TILES x N_TILES accumulator tiles of
# 16 x 8 (mma.sync m16n8k16, fp16 in, float32 accumulate).
#
# Shared memory (dynamic, bytes computed by TileConfig.shared_bytes):
#   a_ring  STAGES x [TILE_ROWS][STRIDE] halves: gathered feature rows of one stage; k-step j of the
#           stage at halves [16 j, 16 j + 16) of each row;
#   b_ring  STAGES x [OUT_CHANNELS][STRIDE] halves: W[tap][n][c0 .. c0 + 15] of k-step j at the same
#           place (k contiguous per output channel n: the "col" B operand as stored);
#   STRIDE = STAGE_CHANNELS + 8 halves: rows 16-byte aligned (cp.async, ldmatrix) and the eight row
#           addresses of an ldmatrix phase fall in distinct bank quads (no bank conflicts);
#   sources int [taps][TILE_ROWS]: neighbour row per tap and tile row (n_in for rows past n_out);
#   chunk_any int [taps][TILE_ROWS / 32]: whether a 32-row chunk has a neighbour through the tap;
#   active  int [taps] + count: the taps with some neighbour in the tile, ascending.
#
# Reduction: k-step q (0 <= q < active_count * cpt, cpt = channels_pad / 16) is tap active[q / cpt],
# channels 16 (q % cpt) + [0, 16); stage s holds k-steps s * KSTEPS + [0, KSTEPS). The order of
# k-steps per output element is the order of _cuda.sparse_conv_fp16 (taps ascending, channel
# slices ascending; with TILE_ROWS = 64 the same taps skipped), so both are expected to give the
# same bits; other tile sizes only add or drop k-steps whose A row is zero for that element.
#
# Pipeline (STAGES-deep ring, one cp.async group per stage, empty groups keep the count uniform):
#   prologue: stages 0 .. STAGES-2 issued;
#   iteration s: wait until group s landed (cp.async.wait_group STAGES-2), __syncthreads (stage s
#   visible to all; everyone is done with stage s-1, whose slot is refilled next), issue stage
#   s + STAGES - 1 into slot (s - 1) % STAGES, multiply stage s.
# Copies: each thread copies 16-byte pieces of one k-step j_t = (tid % (2 KSTEPS)) / 2, half
# h_t = tid % 2, of rows tid / (2 KSTEPS) + i * THREADS / (2 KSTEPS) of A and of B. VECTOR = 1
# (channels_in % 8 == 0: 16-byte aligned feature rows) gathers A with cp.async as well, src-size 0
# (zero fill) for a missing neighbour or channels >= channels_in; VECTOR = 0 gathers A element by
# element with ordinary loads and shared stores (visible after the next __syncthreads, before
# that slot is read).
# Fragments: ldmatrix.x4 (lane l addresses row l % 8 of 8 x 8 matrix l / 8; lane l receives row
# l / 4, halves 2 (l % 4) + {0, 1} of each matrix): A matrices (rows 0-7, k 0-7), (rows 8-15,
# k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a0..a3 of mma m16n8k16 (lane l addresses
# row l % 16, k 8 (l / 16)); B matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
# (n 8-15, k 8-15) = b0, b1 of n-tile 2p and b0, b1 of n-tile 2p + 1 (lane l addresses
# n (l % 8) + 8 (l / 16), k 8 ((l / 8) % 2)).
# Epilogue straight from the accumulators (c0, c1 = row group, columns pair, pair + 1; c2, c3 =
# row group + 8): + bias (+ residual) (ReLU) in float32, cvt.rn to fp16 pairs, 32-bit stores.
_SPARSE_CONV_TILED = r"""
#define THREADS (32 * WARPS_M * WARPS_N)
#define WARP_ROWS (TILE_ROWS / WARPS_M)
#define WARP_COLS (OUT_CHANNELS / WARPS_N)
#define M_TILES (WARP_ROWS / 16)
#define N_TILES (WARP_COLS / 8)
#define KSTEPS (STAGE_CHANNELS / 16)
#define STRIDE (STAGE_CHANNELS + 8)
#define A_STAGE (TILE_ROWS * STRIDE)
#define B_STAGE (OUT_CHANNELS * STRIDE)
#define PIECES_PER_ROW (2 * KSTEPS)
#define ROW_STEP (THREADS / PIECES_PER_ROW)
#define ROW_CHUNKS (TILE_ROWS / 32)

static_assert(TILE_ROWS % 32 == 0 && TILE_ROWS % (16 * WARPS_M) == 0, "rows per block");
static_assert(OUT_CHANNELS % (16 * WARPS_N) == 0, "columns per warp: a multiple of 16");
static_assert(STAGE_CHANNELS == 16 || STAGE_CHANNELS == 32 || STAGE_CHANNELS == 64, "stage channels");
static_assert(STAGES >= 2 && STAGES <= 4, "pipeline stages");
static_assert(THREADS % PIECES_PER_ROW == 0 && THREADS <= 1024, "threads");

__device__ __forceinline__ float half_to_float(unsigned short bits) {
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits));
    return value;
}

/* Two floats -> fp16 pair (round to nearest even), ``low`` in the low 16 bits. */
__device__ __forceinline__ unsigned int pack_half2(float low, float high) {
    unsigned int bits;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(bits) : "f"(high), "f"(low));
    return bits;
}

/* Shared-window address of a generic pointer into shared memory. */
__device__ __forceinline__ unsigned int shared_address(const void* pointer) {
    unsigned int address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(pointer));
    return address;
}

/* 16 bytes global -> shared, asynchronous; bytes past ``size`` (0 or 16) are zero-filled and
   not read. */
__device__ __forceinline__ void copy_async_16(unsigned int destination, const void* source, int size) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(destination), "l"(source), "r"(size) : "memory");
}

__device__ __forceinline__ void copy_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int PENDING>
__device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(PENDING) : "memory");
}

__device__ __forceinline__ void load_matrix_x4(unsigned int* r, unsigned int address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
}

__device__ __forceinline__ void mma_16x8x16(float* c, const unsigned int* a,
                                            unsigned int b0, unsigned int b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Issue the copies of stage ``stage`` (k-steps stage * KSTEPS + [0, KSTEPS)) into ring slot
   ``slot``; k-steps past ``ksteps_total`` are not copied (never read). */
__device__ __forceinline__ void load_stage(
        const int stage, const int slot, const int ksteps_total, const int cpt,
        const int* active, const int* sources,
        const unsigned short* __restrict__ features, const unsigned short* __restrict__ weight,
        unsigned short* a_ring, unsigned short* b_ring,
        const int n_in, const int channels_in, const int channels_pad) {
    const int tid = threadIdx.x;
    const int step = (tid % PIECES_PER_ROW) >> 1, half = (tid & 1) * 8, first = tid / PIECES_PER_ROW;
    const int q = stage * KSTEPS + step;
    if (q < ksteps_total) {
        const int index = q / cpt;
        const int tap = active[index];
        const int channel = (q - index * cpt) * 16 + half;
        const unsigned int b_base = shared_address(b_ring + slot * B_STAGE + step * 16 + half);
        const unsigned short* w = weight + (long long)tap * OUT_CHANNELS * channels_pad + channel;
#pragma unroll
        for (int p = 0; p < (OUT_CHANNELS + ROW_STEP - 1) / ROW_STEP; ++p) {
            const int n = first + p * ROW_STEP;
            if (OUT_CHANNELS % ROW_STEP == 0 || n < OUT_CHANNELS)
                copy_async_16(b_base + n * (STRIDE * 2), w + (long long)n * channels_pad, 16);
        }
#if VECTOR
        const unsigned int a_base = shared_address(a_ring + slot * A_STAGE + step * 16 + half);
        const int* rows = sources + tap * TILE_ROWS;
        const bool channel_ok = channel < channels_in;
#pragma unroll
        for (int p = 0; p < (TILE_ROWS + ROW_STEP - 1) / ROW_STEP; ++p) {
            const int r = first + p * ROW_STEP;
            if (TILE_ROWS % ROW_STEP == 0 || r < TILE_ROWS) {
                const int source = rows[r];
                const bool ok = channel_ok && source < n_in;
                const unsigned short* from = ok ? features + (long long)source * channels_in + channel : features;
                copy_async_16(a_base + r * (STRIDE * 2), from, ok ? 16 : 0);
            }
        }
#endif
    }
#if !VECTOR
#pragma unroll
    for (int j = 0; j < KSTEPS; ++j) {
        const int k = stage * KSTEPS + j;
        if (k >= ksteps_total) break;
        const int index = k / cpt;
        const int* rows = sources + active[index] * TILE_ROWS;
        const int c0 = (k - index * cpt) * 16;
        unsigned short* a_stage = a_ring + slot * A_STAGE + j * 16;
        for (int i = tid; i < TILE_ROWS * 16; i += THREADS) {
            const int r = i >> 4, c = c0 + (i & 15);
            const int source = rows[r];
            a_stage[r * STRIDE + (i & 15)] = (source < n_in && c < channels_in)
                ? features[(long long)source * channels_in + c] : (unsigned short)0;
        }
    }
#endif
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) sparse_conv_fp16_tiled(
        const unsigned short* __restrict__ features,   /* fp16 [n_in, channels_in] */
        const unsigned short* __restrict__ weight,     /* fp16 [taps, OUT_CHANNELS, channels_pad] */
        const int* __restrict__ neighbors,             /* [taps, n_out], n_in = no neighbour */
        const unsigned short* __restrict__ bias,       /* fp16 [OUT_CHANNELS] */
        const unsigned short* __restrict__ residual,   /* fp16 [n_out, OUT_CHANNELS] or null */
        unsigned short* __restrict__ out,              /* fp16 [n_out, OUT_CHANNELS] */
        const int n_in, const int n_out, const int channels_in, const int channels_pad,
        const int taps, const int relu) {
    extern __shared__ __align__(16) unsigned char shared[];
    unsigned short* a_ring = reinterpret_cast<unsigned short*>(shared);
    unsigned short* b_ring = a_ring + STAGES * A_STAGE;
    int* sources = reinterpret_cast<int*>(b_ring + STAGES * B_STAGE);
    int* chunk_any = sources + taps * TILE_ROWS;
    int* active = chunk_any + taps * ROW_CHUNKS;
    int* active_count = active + taps;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_row = (warp / WARPS_N) * WARP_ROWS, warp_col = (warp % WARPS_N) * WARP_COLS;
    const long long row0 = (long long)blockIdx.x * TILE_ROWS;

    /* Neighbour rows of the tile for every tap (independent loads, unrolled so several are in
       flight), then per 32-row chunk whether any is present: the bound is a multiple of 32, so
       every warp runs whole iterations (full ballots). */
#pragma unroll 4
    for (int i = tid; i < taps * TILE_ROWS; i += THREADS) {
        const int t = i / TILE_ROWS;
        const long long o = row0 + (i - t * TILE_ROWS);
        sources[i] = o < n_out ? neighbors[(long long)t * n_out + o] : n_in;
    }
    __syncthreads();
    for (int i = tid; i < taps * TILE_ROWS; i += THREADS) {
        const unsigned int present = __ballot_sync(0xffffffffu, sources[i] < n_in);
        if (lane == 0) chunk_any[i >> 5] = present != 0u;
    }
    __syncthreads();
    if (warp == 0) {                     /* compact the active taps, ascending */
        int count = 0;
        for (int base = 0; base < taps; base += 32) {
            const int t = base + lane;
            int used = 0;
            if (t < taps)
                for (int c = 0; c < ROW_CHUNKS; ++c) used |= chunk_any[t * ROW_CHUNKS + c];
            const unsigned int mask = __ballot_sync(0xffffffffu, used);
            if (used) active[count + __popc(mask & ((1u << lane) - 1u))] = t;
            count += __popc(mask);
        }
        if (lane == 0) *active_count = count;
    }
    __syncthreads();

    const int cpt = channels_pad >> 4;                     /* k-steps per tap */
    const int ksteps_total = *active_count * cpt;
    const int n_stages = (ksteps_total + KSTEPS - 1) / KSTEPS;

    float acc[M_TILES][N_TILES][4];
#pragma unroll
    for (int m = 0; m < M_TILES; ++m)
#pragma unroll
        for (int j = 0; j < N_TILES; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.0f;

    /* Per-lane ldmatrix row addresses (bytes) in slot 0, k-step 0. */
    const unsigned int a_lane = shared_address(a_ring)
        + ((warp_row + (lane & 15)) * STRIDE + (lane >> 4) * 8) * 2;
    const unsigned int b_lane = shared_address(b_ring)
        + ((warp_col + (lane & 7) + ((lane >> 4) << 3)) * STRIDE + ((lane >> 3) & 1) * 8) * 2;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_stages)
            load_stage(s, s, ksteps_total, cpt, active, sources, features, weight, a_ring, b_ring,
                       n_in, channels_in, channels_pad);
        copy_async_commit();
    }
    for (int s = 0; s < n_stages; ++s) {
        copy_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = s + STAGES - 1;
        if (next < n_stages)
            load_stage(next, next % STAGES, ksteps_total, cpt, active, sources, features, weight,
                       a_ring, b_ring, n_in, channels_in, channels_pad);
        copy_async_commit();
        const int slot = s % STAGES;
        const unsigned int a_slot = a_lane + slot * (A_STAGE * 2);
        const unsigned int b_slot = b_lane + slot * (B_STAGE * 2);
#pragma unroll
        for (int j = 0; j < KSTEPS; ++j) {
            if (j > 0 && s * KSTEPS + j >= ksteps_total) break;     /* uniform: last stage only */
            unsigned int a[M_TILES][4];
#pragma unroll
            for (int m = 0; m < M_TILES; ++m)
                load_matrix_x4(a[m], a_slot + (m * 16 * STRIDE + j * 16) * 2);
#pragma unroll
            for (int p = 0; p < N_TILES / 2; ++p) {
                unsigned int b[4];
                load_matrix_x4(b, b_slot + (p * 16 * STRIDE + j * 16) * 2);
#pragma unroll
                for (int m = 0; m < M_TILES; ++m) {
                    mma_16x8x16(acc[m][2 * p], a[m], b[0], b[1]);
                    mma_16x8x16(acc[m][2 * p + 1], a[m], b[2], b[3]);
                }
            }
        }
    }
    copy_async_wait<0>();

    const int group = lane >> 2, pair = (lane & 3) * 2;
#pragma unroll
    for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const long long row = row0 + warp_row + m * 16 + group + half * 8;
            if (row >= n_out) continue;
#pragma unroll
            for (int j = 0; j < N_TILES; ++j) {
                const int column = warp_col + j * 8 + pair;
                float low = acc[m][j][2 * half] + half_to_float(bias[column]);
                float high = acc[m][j][2 * half + 1] + half_to_float(bias[column + 1]);
                if (residual != 0) {
                    const unsigned int skip = *reinterpret_cast<const unsigned int*>(
                        residual + row * OUT_CHANNELS + column);
                    low += half_to_float((unsigned short)(skip & 0xffffu));
                    high += half_to_float((unsigned short)(skip >> 16));
                }
                if (relu) { low = fmaxf(low, 0.0f); high = fmaxf(high, 0.0f); }
                *reinterpret_cast<unsigned int*>(out + row * OUT_CHANNELS + column) = pack_half2(low, high);
            }
        }
    }
}
"""
_KERNEL_NAME = "sparse_conv_fp16_tiled"
_DEFAULT_SHARED_LIMIT = 48 * 1024          # dynamic shared memory without the opt-in attribute
_SHARED_OPTIN_ATTRIBUTE = 97               # cudaDevAttrMaxSharedMemoryPerBlockOptin


@dataclass(frozen=True)
class TileConfig:
    """Compile-time tiling of :func:`sparse_conv_fp16_tiled`.

    A block of ``warps_rows * warps_cols`` warps owns ``rows`` consecutive output rows and all O
    columns; each warp a ``rows / warps_rows`` x ``O / warps_cols`` sub-tile of float32
    accumulators (16 x 8 mma tiles). One pipeline stage stages ``stage_channels`` input channels
    (``stage_channels / 16`` consecutive k-steps of 16 channels, possibly of consecutive active
    taps) of the tile's gathered feature rows and of the weight; ``stages`` stage buffers form the
    cp.async ring. ``min_blocks`` is the ``__launch_bounds__`` minimum of resident blocks per SM
    (1: no register cap).

    Constraints: ``rows`` a multiple of 32 and of 16 * warps_rows; O a multiple of 16 * warps_cols
    (checked at launch); stage_channels in (16, 32, 64); 2 <= stages <= 4; at most 1024 threads.
    """

    rows: int = 64
    warps_rows: int = 2
    warps_cols: int = 4
    stage_channels: int = 32
    stages: int = 3
    min_blocks: int = 1

    def __post_init__(self) -> None:
        if (self.rows <= 0 or self.rows % 32 or self.warps_rows <= 0 or self.warps_cols <= 0
                or self.rows % (16 * self.warps_rows) or self.stage_channels not in (16, 32, 64)
                or not 2 <= self.stages <= 4 or self.threads > 1024 or self.min_blocks < 1):
            raise ValueError(f"invalid tile config {self}")

    @property
    def threads(self) -> int:
        return 32 * self.warps_rows * self.warps_cols

    def fits(self, channels_out: int) -> bool:
        """Whether the columns split evenly into warp sub-tiles of a multiple of 16 columns."""
        return channels_out > 0 and channels_out % (16 * self.warps_cols) == 0

    def accumulators(self, channels_out: int) -> int:
        """float32 accumulators per thread: (rows / warps_rows) x (O / warps_cols) / 32. ptxas
        (sm_80 / sm_90, no spills): 32 of them take about 70-80 registers, 64 about 105-127, 128
        about 190 (a register-starved SM: keep it at 64 or below)."""
        return self.rows // self.warps_rows * (channels_out // self.warps_cols) // 32

    def shared_bytes(self, channels_out: int, taps: int) -> int:
        """Dynamic shared memory of one block: the A and B rings (rows padded to stage_channels + 8
        halves) plus int32 neighbour rows [taps, rows], chunk flags [taps, rows / 32], active taps
        [taps] and their count."""
        ring = self.stages * (self.rows + channels_out) * (self.stage_channels + 8) * 2
        return ring + 4 * (taps * self.rows + taps * (self.rows // 32) + taps + 1)

    def options(self, channels_out: int, vector: bool) -> tuple[str, ...]:
        """NVRTC ``-D`` options of this variant."""
        return (f"-DOUT_CHANNELS={channels_out}", f"-DTILE_ROWS={self.rows}",
                f"-DWARPS_M={self.warps_rows}", f"-DWARPS_N={self.warps_cols}",
                f"-DSTAGE_CHANNELS={self.stage_channels}", f"-DSTAGES={self.stages}",
                f"-DMIN_BLOCKS={self.min_blocks}", f"-DVECTOR={int(vector)}")


def default_tile_config(channels_out: int) -> TileConfig:
    """The tiling used when none is given, per O (a multiple of 16 up to 128): 64-row tiles,
    32-channel stages, a 3-deep ring; warps of 32 x 32 accumulators (2 x O/32 warps) where O is a
    multiple of 32 of at least 64, else 4 warps of 16 rows x O columns."""
    if channels_out >= 64 and channels_out % 32 == 0:
        return TileConfig(rows=64, warps_rows=2, warps_cols=min(channels_out // 32, 4),
                          stage_channels=32, stages=3)
    return TileConfig(rows=64, warps_rows=4, warps_cols=1, stage_channels=32, stages=3)


@lru_cache(maxsize=None)
def _tiled_kernel(channels_out: int, config: TileConfig, vector: bool) -> Any:
    """The compiled variant (CuPy caches the binary per device and on disk)."""
    import cupy
    module = cupy.RawModule(code=_SPARSE_CONV_TILED, options=config.options(channels_out, vector))
    return module.get_function(_KERNEL_NAME)


_shared_limits_set: dict[tuple[int, int], int] = {}


@lru_cache(maxsize=None)
def _shared_optin_limit(device: int) -> int:
    import cupy
    return int(cupy.cuda.runtime.deviceGetAttribute(_SHARED_OPTIN_ATTRIBUTE, device))


def _allow_shared(kernel: Any, nbytes: int) -> None:
    """Raise the kernel's dynamic shared-memory limit to ``nbytes`` when above the default 48 KiB
    (once per kernel, device and size); ValueError beyond the device's opt-in maximum."""
    if nbytes <= _DEFAULT_SHARED_LIMIT:
        return
    import cupy
    device = cupy.cuda.Device().id
    limit = _shared_optin_limit(device)
    if nbytes > limit:
        raise ValueError(f"sparse_conv_fp16_tiled: {nbytes} bytes of shared memory exceed the "
                         f"device limit {limit} (too many taps for this tile config)")
    key = (id(kernel), device)
    if _shared_limits_set.get(key, 0) < nbytes:
        kernel.max_dynamic_shared_size_bytes = nbytes      # cuFuncSetAttribute on this device
        _shared_limits_set[key] = nbytes


class TiledConv:
    """One layer's fp16 sparse convolution, prepared once for :meth:`__call__`: packed weight
    fp16 [K, O, I_pad] (``_cuda.pack_conv_weight``), bias fp16 [O], the compiled kernel of its
    tiling (default :func:`default_tile_config`) and its shared-memory size. A call then costs one
    output allocation and one launch: the sparse encoder's host time is mostly launch overhead.

    ValueError for a packed weight that does not fit ``channels_in`` or O unsupported by
    ``_cuda.fused_conv_supported`` or not split by the tiling.
    """

    def __init__(self, packed_weight: Any, bias: Any, channels_in: int,
                 config: Optional[TileConfig] = None):
        import cupy

        from bevfusion_ros.lidar._cuda import fused_conv_supported
        taps, channels_out, channels_pad = (int(size) for size in packed_weight.shape)
        if (not fused_conv_supported(channels_out) or packed_weight.dtype != cupy.float16
                or not packed_weight.flags.c_contiguous or channels_pad != -(-channels_in // 16) * 16):
            raise ValueError(f"sparse_conv_fp16_tiled: packed weight {packed_weight.shape} "
                             f"{packed_weight.dtype} does not fit {taps} taps x {channels_in} channels")
        self.config = default_tile_config(channels_out) if config is None else config
        if not self.config.fits(channels_out):
            raise ValueError(f"sparse_conv_fp16_tiled: {self.config} does not split {channels_out} columns")
        self.packed_weight, self.taps = packed_weight, taps
        self.channels_in, self.channels_out = channels_in, channels_out
        self.bias = cupy.ascontiguousarray(bias, dtype=cupy.float16)
        self._kernel = _tiled_kernel(channels_out, self.config, channels_in % 8 == 0)
        self._shared = self.config.shared_bytes(channels_out, taps)
        _allow_shared(self._kernel, self._shared)      # on this device, where the weight lives
        self._static_args = (np.int32(channels_in), np.int32(channels_pad), np.int32(taps))

    def __call__(self, features: Any, neighbors: Any, residual: Any = None, relu: bool = False) -> Any:
        """features fp16 [N_in, I], neighbors int32 [K, N_out] (N_in = none: that row reads
        zeros), residual fp16 [N_out, O] or None; ``relu`` applies max(., 0) last -> a new fp16
        [N_out, O]. ValueError for arrays that do not fit."""
        import cupy
        features = cupy.ascontiguousarray(features, dtype=cupy.float16)
        neighbors = cupy.ascontiguousarray(neighbors, dtype=cupy.int32)
        (n_in, channels_in), (taps, n_out) = features.shape, neighbors.shape
        if channels_in != self.channels_in or taps != self.taps:
            raise ValueError(f"sparse_conv_fp16_tiled: packed weight {self.packed_weight.shape} "
                             f"does not fit {taps} taps x {channels_in} channels")
        out = cupy.empty((n_out, self.channels_out), dtype=cupy.float16)
        if residual is not None:
            residual = cupy.ascontiguousarray(residual, dtype=cupy.float16)
            if residual.shape != out.shape:
                raise ValueError(f"sparse_conv_fp16_tiled: residual {residual.shape} != output {out.shape}")
        if n_out == 0:
            return out
        self._kernel((-(-n_out // self.config.rows),), (self.config.threads,),
                     (features, self.packed_weight, neighbors, self.bias,
                      residual if residual is not None else np.uint64(0), out,   # uint64 0: null
                      np.int32(n_in), np.int32(n_out), self._static_args[0], self._static_args[1],
                      self._static_args[2], np.int32(relu)),
                     shared_mem=self._shared)
        return out


def sparse_conv_fp16_tiled(features: Any, packed_weight: Any, neighbors: Any, bias: Any,
                           residual: Any = None, relu: bool = False,
                           config: Optional[TileConfig] = None) -> Any:
    """One fp16 sparse convolution: act(sum over taps of features[nb] @ W[tap] + bias (+ residual)).

    Same contract and result bits as :func:`bevfusion_ros.lidar._cuda.sparse_conv_fp16`:
    features fp16 [N_in, I]; packed_weight fp16 [K, O, I_pad] from ``_cuda.pack_conv_weight``
    (I_pad = I rounded up to 16, zeros past I); neighbors int32 [K, N_out] (N_in = none: that
    row reads zeros); bias fp16 [O]; residual fp16 [N_out, O] or None; ``relu`` applies max(., 0)
    last. Products exact, sums in float32 on tensor cores, one cvt.rn rounding to fp16 at the end.
    Returns a new fp16 [N_out, O]. ``config`` picks the tiling (default
    :func:`default_tile_config`); ValueError for a packed weight or residual that does not fit,
    for O unsupported by ``_cuda.fused_conv_supported`` or not split by ``config``.
    """
    return TiledConv(packed_weight, bias, int(features.shape[1]), config)(features, neighbors, residual, relu)
