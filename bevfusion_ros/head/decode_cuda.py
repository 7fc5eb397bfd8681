"""CuPy :func:`~bevfusion_ros.head.decode.decode_boxes`: one elementwise kernel, then a stable sort.

The kernel decodes every proposal into a row of :data:`BOX_COLUMNS` plus a keep flag with the
NumPy version's arithmetic: the same dtype (the score's, at least float32), the config
constants rounded to that dtype as NumPy's weak Python scalars are, and every
multiply/add rounded on its own (``__fmul_rn``-style intrinsics, no contraction), so x, y, vx,
vy, label, score and the keep decision on them are bit-identical. ``exp`` and ``atan2`` are
CUDA's (float32: at most 2 and 3 ulp, not NumPy's SIMD versions), so w, l, h, yaw and z may
differ by a few ulp. The argmax takes the first maximum, and like ``np.argmax`` the first NaN;
such a proposal has a NaN score and is never kept.

The kept rows are then ordered by descending score with ``cupy.argsort`` (documented stable:
equal scores keep proposal order, as NumPy's ``kind="stable"`` on ``-score``). Compacting to M rows reads
the count back to the host, the one synchronisation of the decode (CUDA-BEVFusion syncs here too).
CuPy is imported inside the functions: importing this module never needs it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from bevfusion_ros.config import PipelineConfig
from bevfusion_ros.head.decode import BOX_COLUMNS, HEAD_OUTPUT_CHANNELS, check_outputs

_PREAMBLE = r"""
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
"""

# Raw inputs are [channels, K] C-contiguous, element (c, i) at c * K + i; boxes is [K, 11].
_DECODE_OPERATION = r"""
T best = score[i];
int label = 0;
for (int c = 1; c < classes && !isnan(best); ++c) {
    const T value = score[c * proposals + i];
    if (value > best || isnan(value)) { best = value; label = c; }
}
const T x = add_rn(mul_rn(reg[i], cell_x), min_x);
const T y = add_rn(mul_rn(reg[proposals + i], cell_y), min_y);
const T w = exp(dim[i]), l = exp(dim[proposals + i]), h = exp(dim[2 * proposals + i]);
const T z = sub_rn(height[i], mul_rn(h, (T)0.5));
T* box = &boxes[i * 11];
box[0] = x; box[1] = y; box[2] = z; box[3] = w; box[4] = l; box[5] = h;
box[6] = atan2(rot[i], rot[proposals + i]);
box[7] = vel[i]; box[8] = vel[proposals + i];
box[9] = (T)label; box[10] = best;
keep = best >= threshold && x >= low_x && x <= high_x && y >= low_y && y <= high_y
       && z >= low_z && z <= high_z;
"""


@lru_cache(maxsize=None)
def _decode_kernel():
    import cupy
    return cupy.ElementwiseKernel(
        "raw T score, raw T rot, raw T dim, raw T reg, raw T height, raw T vel, int32 classes, "
        "int32 proposals, T cell_x, T cell_y, T min_x, T min_y, T threshold, "
        "T low_x, T low_y, T low_z, T high_x, T high_y, T high_z",
        "raw T boxes, bool keep", _DECODE_OPERATION, "decode_boxes", preamble=_PREAMBLE)


def _constants(config: PipelineConfig, dtype: np.dtype) -> tuple[Any, ...]:
    """(cell_x, cell_y, min_x, min_y, threshold, low xyz, high xyz) as ``dtype`` scalars."""
    head, cell = config.head, config.bev_cell_size
    values = (*cell, *config.voxelization.point_range_min[:2], head.score_threshold, *head.post_center_range)
    return tuple(dtype.type(value) for value in values)


def decode_boxes_cuda(outputs: Mapping[str, Any], config: PipelineConfig) -> Any:
    """Head outputs ``[1, channels, K]`` (CuPy, or NumPy to upload) -> CuPy float32 boxes
    ``[M, 11]`` sorted by descending score, as :func:`decode_boxes`."""
    import cupy
    classes = len(config.head.class_names)
    dtype = check_outputs(outputs, classes)
    p = {name: cupy.ascontiguousarray(cupy.asarray(outputs[name])[0], dtype=dtype)
         for name in HEAD_OUTPUT_CHANNELS}
    proposals = p["score"].shape[1]
    boxes = cupy.empty((proposals, len(BOX_COLUMNS)), dtype=dtype)
    keep = cupy.empty(proposals, dtype=cupy.bool_)
    _decode_kernel()(p["score"], p["rot"], p["dim"], p["reg"], p["height"], p["vel"], np.int32(classes),
                     np.int32(proposals), *_constants(config, dtype), boxes, keep)
    kept = boxes[keep]                                   # proposal order; M is read back here
    if len(kept) > 1:
        # 0 - score, not -score: both zeros become +0, so the radix sort ties them like NumPy.
        kept = kept[cupy.argsort(0.0 - kept[:, BOX_COLUMNS.index("score")])]
    return cupy.ascontiguousarray(kept, dtype=cupy.float32)
