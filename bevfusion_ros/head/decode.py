"""TransFusion head outputs -> boxes (spec 6.3), NumPy.

Output layout: float32 ``[M, 11]`` with columns :data:`BOX_COLUMNS` =
``x, y, z, w, l, h, yaw, vx, vy, label, score`` in the lidar frame, CUDA-BEVFusion's Python
layout (spec 6.5). ``z`` is the decoded ``height - h/2``, which for BEVFusion-trained weights is
the box centre; ``yaw`` is mmdet3d's clockwise angle (see :mod:`bevfusion_ros.detections`).
No NMS (spec 6.3).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bevfusion_ros.config import PipelineConfig
from bevfusion_ros.runtime.array_module import is_cupy

BOX_COLUMNS = ("x", "y", "z", "w", "l", "h", "yaw", "vx", "vy", "label", "score")
# Head outputs in the export's declaration order (spec 2.5) -> channels (spec 6.2); ``score``
# has one channel per class (None here).
HEAD_OUTPUT_CHANNELS: dict[str, int | None] = {
    "score": None, "rot": 2, "dim": 3, "reg": 2, "height": 1, "vel": 2}


def check_outputs(outputs: Mapping[str, Any], num_classes: int) -> np.dtype:
    """Raise ``ValueError`` unless every head output is ``[1, channels, K]`` (NumPy or CuPy);
    return the arithmetic dtype, the score's dtype promoted to at least float32."""
    missing = [name for name in HEAD_OUTPUT_CHANNELS if name not in outputs]
    if missing:
        raise ValueError(f"head outputs {missing} are missing; got {sorted(outputs)}")
    score_shape = tuple(np.shape(outputs["score"]))
    if len(score_shape) != 3 or score_shape[:2] != (1, num_classes):
        raise ValueError(f"head output 'score' has shape {list(score_shape)}, expected "
                         f"[1, {num_classes}, K] for {num_classes} classes")
    for name, channels in HEAD_OUTPUT_CHANNELS.items():
        expected = (1, channels or num_classes, score_shape[2])
        if tuple(np.shape(outputs[name])) != expected:
            raise ValueError(f"head output {name!r} has shape {list(np.shape(outputs[name]))}, "
                             f"expected {list(expected)}")
    return np.result_type(outputs["score"].dtype, np.float32)


def _proposals(outputs: Mapping[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Each head output ``[1, channels, K]`` -> ``[channels, K]``, at least float32."""
    outputs = {name: np.asarray(outputs[name]) for name in outputs}
    dtype = check_outputs(outputs, num_classes)
    return {name: outputs[name][0].astype(dtype, copy=False) for name in HEAD_OUTPUT_CHANNELS}


def decode_boxes(outputs: Mapping[str, np.ndarray], config: PipelineConfig) -> np.ndarray:
    """Head outputs ``{score [1,classes,K], rot [1,2,K], dim [1,3,K], reg [1,2,K], height
    [1,1,K], vel [1,2,K]}`` -> boxes float32 ``[M, 11]``, sorted by descending score.

    Per proposal: label = argmax of the class scores (the first maximum wins), score = that
    maximum; kept when score >= ``head.score_threshold`` and the centre lies inside the
    inclusive ``head.post_center_range``. x = reg0 * out_size_factor * voxel_x + min_x (y
    alike), (w, l, h) = exp(dim), z = height - h/2, yaw = atan2(rot0, rot1). Ties in score keep
    proposal order (stable sort). Arithmetic runs in the outputs' precision (at least float32).
    With CuPy outputs it decodes on the GPU (:mod:`bevfusion_ros.head.decode_cuda`) and
    returns CuPy boxes.
    """
    if any(is_cupy(value) for value in outputs.values()):
        from bevfusion_ros.head.decode_cuda import decode_boxes_cuda
        return decode_boxes_cuda(outputs, config)
    head, voxel = config.head, config.voxelization
    p = _proposals(outputs, len(head.class_names))
    label = np.argmax(p["score"], axis=0)
    score = np.take_along_axis(p["score"], label[None], axis=0)[0]
    cell_x, cell_y = config.bev_cell_size
    x = p["reg"][0] * cell_x + voxel.point_range_min[0]
    y = p["reg"][1] * cell_y + voxel.point_range_min[1]
    size = np.exp(p["dim"])                                              # w, l, h
    z = p["height"][0] - size[2] * 0.5
    low, high = head.post_center_range[:3], head.post_center_range[3:]
    keep = ((score >= head.score_threshold)
            & (x >= low[0]) & (x <= high[0]) & (y >= low[1]) & (y <= high[1])
            & (z >= low[2]) & (z <= high[2]))
    yaw = np.arctan2(p["rot"][0], p["rot"][1])
    boxes = np.stack([x, y, z, size[0], size[1], size[2], yaw, p["vel"][0], p["vel"][1],
                      label.astype(x.dtype), score], axis=1)[keep]
    order = np.argsort(-boxes[:, 10], kind="stable")
    return boxes[order].astype(np.float32)
