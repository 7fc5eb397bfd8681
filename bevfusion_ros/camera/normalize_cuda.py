"""CuPy :func:`~bevfusion_ros.camera.normalize.normalize_images`: one thread per output pixel.

Bit-identical to the NumPy version (spec 1.2): the same tap tables (from
:func:`normalize_tables`), the same integer fixed-point blend and the same fp16 level table,
uploaded once per (config, device). A thread reads its two source rows' four RGB pixels, so a
frame reads only the ~2 x ``oh`` source rows the output needs, not the whole image.

With ``remap`` (:mod:`~bevfusion_ros.camera.undistort`) the fused kernel undistorts on the way: each
of a thread's four taps is an undistorted pixel, sampled from the raw image at its remap-table
position with float32 fused multiply-adds (``__fmaf_rn``/``__fsub_rn``: no other contraction, so
the rounding is the NumPy reference's), then blended as above; bit-identical to the NumPy version.

CuPy is imported inside the functions: importing this module never needs it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from bevfusion_ros.camera.normalize import check_images, check_remap, normalize_tables
from bevfusion_ros.config import ImageConfig

BLOCK = (64, 4, 1)        # 64 output columns x 4 output rows; 704 = 11 x 64

_NORMALIZE_SOURCE = r"""
extern "C" __global__ void normalize_images(
        const unsigned char* __restrict__ images,     // [N, H, W, 3] uint8 RGB
        const int* __restrict__ rows,                 // [4, oh]: low, high, weight_low, weight_high
        const int* __restrict__ columns,              // [4, ow]: the same along x, in pixels
        const unsigned short* __restrict__ levels,    // [3, 256] fp16 bit patterns
        unsigned short* __restrict__ output,          // [N, 3, oh, ow] fp16 bit patterns
        int height, int width, int out_height, int out_width) {
    const int ox = blockIdx.x * blockDim.x + threadIdx.x;
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= out_width || oy >= out_height) return;
    const long long row_bytes = 3LL * width;
    const unsigned char* image = images + blockIdx.z * (height * row_bytes);
    const unsigned char* top = image + rows[oy] * row_bytes;
    const unsigned char* bottom = image + rows[out_height + oy] * row_bytes;
    const int x0 = 3 * columns[ox], x1 = 3 * columns[out_width + ox];
    const int hx = columns[2 * out_width + ox], lx = columns[3 * out_width + ox];
    const int hy = rows[2 * out_height + oy], ly = rows[3 * out_height + oy];
    const long long plane = (long long)out_height * out_width;
    unsigned short* out = output + blockIdx.z * 3 * plane + (long long)oy * out_width + ox;
    for (int c = 0; c < 3; ++c) {
        const int upper = (hx * top[x0 + c] + lx * top[x1 + c]) >> 4;           // scale 2**7
        const int lower = (hx * bottom[x0 + c] + lx * bottom[x1 + c]) >> 4;
        const int level = (((hy * upper) >> 16) + ((ly * lower) >> 16) + 2) >> 2;   // 0..255
        out[c * plane] = levels[c * 256 + level];
    }
}
"""

_UNDISTORT_NORMALIZE_SOURCE = r"""
__device__ __forceinline__ float raw_level(const unsigned char* image, int x, int y, int c,
                                           int height, int width) {
    // BORDER_CONSTANT 0: a tap outside the raw image reads 0
    return (x >= 0 && x < width && y >= 0 && y < height) ? (float)image[(3LL * y * width + 3LL * x) + c] : 0.0f;
}

// One undistorted pixel: the raw image sampled at ``source`` (module docstring of camera/undistort.py).
__device__ __forceinline__ void undistorted_pixel(const unsigned char* image, float2 source, int height,
                                                  int width, int* rgb) {
    const float left = floorf(source.x), upper = floorf(source.y);
    const float ax = __fsub_rn(source.x, left), ay = __fsub_rn(source.y, upper);
    const int x0 = (int)left, y0 = (int)upper;
    for (int c = 0; c < 3; ++c) {
        const float p00 = raw_level(image, x0, y0, c, height, width);
        const float p01 = raw_level(image, x0 + 1, y0, c, height, width);
        const float p10 = raw_level(image, x0, y0 + 1, c, height, width);
        const float p11 = raw_level(image, x0 + 1, y0 + 1, c, height, width);
        const float top = __fmaf_rn(ax, __fsub_rn(p01, p00), p00);
        const float bottom = __fmaf_rn(ax, __fsub_rn(p11, p10), p10);
        const float level = __fmaf_rn(ay, __fsub_rn(bottom, top), top);
        const int rounded = __float2int_rn(level);              // rint: half to even, as np.rint
        rgb[c] = rounded < 0 ? 0 : (rounded > 255 ? 255 : rounded);
    }
}

extern "C" __global__ void normalize_undistorted_images(
        const unsigned char* __restrict__ images,     // [N, H, W, 3] uint8 raw RGB
        const float2* __restrict__ maps,              // [M, H, W] (x, y): raw position of each undistorted pixel
        const int* __restrict__ map_index,            // [N]: the camera's map in maps, -1: not distorted
        const int* __restrict__ rows,                 // [4, oh]: low, high, weight_low, weight_high
        const int* __restrict__ columns,              // [4, ow]: the same along x, in pixels
        const unsigned short* __restrict__ levels,    // [3, 256] fp16 bit patterns
        unsigned short* __restrict__ output,          // [N, 3, oh, ow] fp16 bit patterns
        int height, int width, int out_height, int out_width) {
    const int ox = blockIdx.x * blockDim.x + threadIdx.x;
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= out_width || oy >= out_height) return;
    const long long pixels = (long long)height * width;
    const unsigned char* image = images + blockIdx.z * 3 * pixels;
    const int y0 = rows[oy], y1 = rows[out_height + oy];
    const int x0 = columns[ox], x1 = columns[out_width + ox];
    const int hx = columns[2 * out_width + ox], lx = columns[3 * out_width + ox];
    const int hy = rows[2 * out_height + oy], ly = rows[3 * out_height + oy];
    const long long taps[4] = {(long long)y0 * width + x0, (long long)y0 * width + x1,
                               (long long)y1 * width + x0, (long long)y1 * width + x1};
    int p[4][3];                                      // top-left, top-right, bottom-left, bottom-right
    const int map = map_index[blockIdx.z];
    for (int t = 0; t < 4; ++t) {
        if (map < 0) {
            for (int c = 0; c < 3; ++c) p[t][c] = image[3 * taps[t] + c];
        } else {
            undistorted_pixel(image, maps[map * pixels + taps[t]], height, width, p[t]);
        }
    }
    const long long plane = (long long)out_height * out_width;
    unsigned short* out = output + blockIdx.z * 3 * plane + (long long)oy * out_width + ox;
    for (int c = 0; c < 3; ++c) {
        const int upper = (hx * p[0][c] + lx * p[1][c]) >> 4;                 // scale 2**7
        const int lower = (hx * p[2][c] + lx * p[3][c]) >> 4;
        const int level = (((hy * upper) >> 16) + ((ly * lower) >> 16) + 2) >> 2;   // 0..255
        out[c * plane] = levels[c * 256 + level];
    }
}
"""


@lru_cache(maxsize=None)
def _normalize_kernel():
    import cupy
    return cupy.RawKernel(_NORMALIZE_SOURCE, "normalize_images")


@lru_cache(maxsize=None)
def _undistort_normalize_kernel():
    import cupy
    return cupy.RawKernel(_UNDISTORT_NORMALIZE_SOURCE, "normalize_undistorted_images")


@lru_cache(maxsize=8)
def _device_tables(image: ImageConfig, device: int) -> tuple[Any, Any, Any]:
    """(rows int32 ``[4, oh]``, columns int32 ``[4, ow]``, levels uint16 ``[3, 256]``) on ``device``.

    Rows and columns hold (low, high, weight_low, weight_high) per output row/column, with
    source indices in pixels (the NumPy column taps index the interleaved ``W * 3`` row; here
    every third one, divided by 3); levels are the fp16 bit patterns of the NumPy table.
    """
    import cupy
    tables = normalize_tables(image)
    columns = tables.columns
    per_pixel = (columns.low[::3] // 3, columns.high[::3] // 3,
                 columns.weight_low[::3], columns.weight_high[::3])
    rows = (tables.rows.low, tables.rows.high, tables.rows.weight_low, tables.rows.weight_high)
    with cupy.cuda.Device(device):
        return (cupy.asarray(np.stack(rows).astype(np.int32)),
                cupy.asarray(np.stack(per_pixel).astype(np.int32)),
                cupy.asarray(tables.levels.view(np.uint16)))


def output_buffer(out: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """``out`` checked to be a C-contiguous CuPy array of ``shape`` and ``dtype``, or a new one."""
    import cupy
    if out is None:
        return cupy.empty(shape, dtype=dtype)
    if not isinstance(out, cupy.ndarray) or out.shape != shape or out.dtype != np.dtype(dtype) \
            or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous CuPy {np.dtype(dtype)} array of shape "
                         f"{list(shape)}, got {type(out).__name__} {getattr(out, 'dtype', '')} "
                         f"{list(getattr(out, 'shape', ()))}")
    return out


def _stacked(images: Sequence[Any]) -> Any:
    """The images as one C-contiguous CuPy ``[N, H, W, 3]`` uint8 array (a copy only for a list)."""
    import cupy
    if isinstance(images, cupy.ndarray):
        return cupy.ascontiguousarray(images)
    return cupy.stack(images)


def device_remap(remap: Any) -> Any:
    """``remap`` with CuPy tables (uploaded when they are NumPy ones; the pipeline uploads once
    per calibration), checked to be int32 indices and C-contiguous float32 tables."""
    import cupy
    if remap is None:
        return None
    if not isinstance(remap.maps, cupy.ndarray) or not isinstance(remap.map_index, cupy.ndarray):
        remap = remap.to_device()
    if remap.maps.dtype != np.float32 or not remap.maps.flags.c_contiguous or remap.map_index.dtype != np.int32:
        raise ValueError(f"remap tables must be C-contiguous float32 maps and int32 indices, got "
                         f"{remap.maps.dtype} maps and {remap.map_index.dtype} indices")
    return remap


def normalize_images_cuda(images: Sequence[Any], image: ImageConfig, num_cameras: int | None = None,
                          out: Any = None, remap: Any = None) -> Any:
    """CuPy uint8 RGB images -> CuPy float16 ``[N, 3, oh, ow]`` planar, as :func:`normalize_images`.

    images: a CuPy ``[N, H, W, 3]`` uint8 array (read in place) or a sequence of CuPy
            ``[H, W, 3]`` uint8 arrays (stacked first, one device copy);
    out:    optional C-contiguous CuPy float16 ``[N, 3, oh, ow]`` to write into;
    remap:  optional :class:`~bevfusion_ros.camera.undistort.RemapTables` (CuPy, or NumPy
            uploaded here): the distorted cameras' raw images are undistorted on the way.
    Raises ``ValueError`` naming the camera for a wrong count, size, dtype or channel count.
    """
    import cupy
    check_images(images, image, num_cameras, cupy.ndarray)
    check_remap(remap, len(images), image)
    remap = device_remap(remap)
    stacked = _stacked(images)
    count = len(stacked)
    output = output_buffer(out, (count, 3, image.output_height, image.output_width), np.float16)
    rows, columns, levels = _device_tables(image, cupy.cuda.Device().id)
    grid = (-(-image.output_width // BLOCK[0]), -(-image.output_height // BLOCK[1]), count)
    sizes = (np.int32(image.input_height), np.int32(image.input_width),
             np.int32(image.output_height), np.int32(image.output_width))
    if remap is None:
        _normalize_kernel()(grid, BLOCK, (stacked, rows, columns, levels, output, *sizes))
    else:
        _undistort_normalize_kernel()(grid, BLOCK, (stacked, remap.maps, remap.map_index, rows, columns,
                                                    levels, output, *sizes))
    return output
