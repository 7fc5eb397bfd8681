"""Detections of one frame, and their conversion to REP-103 boxes (spec 6.5).

``boxes`` keeps CUDA-BEVFusion's layout ``[M, 11]``: x, y, z, w, l, h, yaw, vx, vy, label,
score (:data:`bevfusion_ros.head.decode.BOX_COLUMNS`) in the lidar frame, where yaw is mmdet3d's
clockwise angle and w is the extent along the box's local x axis at yaw 0. The REP-103 form
(what ROS messages and the JSON carry) is:

* heading psi = -yaw - pi/2, counter-clockwise from +x, wrapped to (-pi, pi];
* size = (length, width, height) = (l, w, h), length along the heading;
* centre z = the decoded z, which is the box centre for BEVFusion-trained weights (spec 6.5
  correction: no h/2 is added).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bevfusion_ros.head.decode import BOX_COLUMNS

# Column indices of BOX_COLUMNS; ground-truth boxes ([M, 9]) are the columns X ... VY.
X, Y, Z, W, L, H, YAW, VX, VY, LABEL, SCORE = range(len(BOX_COLUMNS))
# Corner offsets in units of (length/2, width/2, height/2) in the box frame (x forward, y left,
# z up): bottom face front-left, front-right, rear-right, rear-left, then the top face alike.
_UNIT_CORNERS = np.array([[1, 1, -1], [1, -1, -1], [-1, -1, -1], [-1, 1, -1],
                          [1, 1, 1], [1, -1, 1], [-1, -1, 1], [-1, 1, 1]], dtype=np.float64)


def wrap_angle(angle: np.ndarray | float) -> np.ndarray:
    """Angle(s) in radians wrapped to (-pi, pi]."""
    wrapped = np.pi - np.mod(np.pi - np.asarray(angle, dtype=np.float64), 2 * np.pi)
    return np.where(wrapped <= -np.pi, wrapped + 2 * np.pi, wrapped)


def rep103_heading(yaw: np.ndarray | float) -> np.ndarray:
    """mmdet3d/CUDA-BEVFusion yaw -> REP-103 heading psi = -yaw - pi/2 in (-pi, pi]."""
    return wrap_angle(-np.asarray(yaw, dtype=np.float64) - np.pi / 2)


def cuda_yaw(heading: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`rep103_heading`: psi -> yaw = -psi - pi/2 in (-pi, pi]."""
    return wrap_angle(-np.asarray(heading, dtype=np.float64) - np.pi / 2)


@dataclass(frozen=True)
class Detections:
    """Boxes of one frame plus where and when they were seen and what it cost.

    boxes:        float32 ``[M, 11]`` in the CUDA layout above, sorted by descending score;
    class_names:  label index -> name;
    stamp_ns:     time of the lidar sweep (ns); frame_id: frame of the boxes (the lidar's);
    stage_ms:     wall time per pipeline stage in milliseconds, in execution order;
    cameras_used: names of the cameras that contributed;
    warnings:     degradations of this frame worth reporting (e.g. points dropped).
    """

    boxes: np.ndarray
    class_names: tuple[str, ...]
    stamp_ns: int = 0
    frame_id: str = "lidar"
    stage_ms: dict[str, float] = field(default_factory=dict)
    cameras_used: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.boxes.ndim != 2 or self.boxes.shape[1] != len(BOX_COLUMNS):
            raise ValueError(f"boxes must be [M, {len(BOX_COLUMNS)}] ({', '.join(BOX_COLUMNS)}), "
                             f"got {list(self.boxes.shape)}")
        labels = self.boxes[:, LABEL]
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)
                            or not np.array_equal(labels, np.round(labels))):
            raise ValueError(f"box labels must be integers in [0, {len(self.class_names)}), "
                             f"got {sorted(set(labels.tolist()))}")

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def labels(self) -> np.ndarray:
        """Class index per box, int ``[M]``."""
        return self.boxes[:, LABEL].astype(np.int64)

    @property
    def scores(self) -> np.ndarray:
        return self.boxes[:, SCORE]

    def headings(self) -> np.ndarray:
        """REP-103 heading psi per box, float64 ``[M]`` in (-pi, pi]."""
        return rep103_heading(self.boxes[:, YAW])

    def to_rep103(self) -> list[dict[str, Any]]:
        """One dict per box: label (class name), score, center [x, y, z] (z = box centre),
        size [length, width, height], yaw (psi, CCW from +x, (-pi, pi]), velocity [vx, vy]."""
        boxes = self.boxes.astype(np.float64)
        return [{"label": self.class_names[label], "score": float(box[SCORE]),
                 "center": box[[X, Y, Z]].tolist(), "size": box[[L, W, H]].tolist(),
                 "yaw": float(heading), "velocity": box[[VX, VY]].tolist()}
                for box, label, heading in zip(boxes, self.labels, self.headings())]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the header fields (stamp_ns, frame_id, class_names, cameras_used,
        stage_ms, warnings) and ``boxes``, the :meth:`to_rep103` list (see :meth:`from_dict`)."""
        return {"stamp_ns": self.stamp_ns, "frame_id": self.frame_id,
                "class_names": list(self.class_names), "cameras_used": list(self.cameras_used),
                "stage_ms": self.stage_ms, "warnings": list(self.warnings),
                "boxes": self.to_rep103()}

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> "Detections":
        """Inverse of :meth:`to_dict`, back into the CUDA layout."""
        class_names = tuple(document["class_names"])
        rows = [[*box["center"], box["size"][1], box["size"][0], box["size"][2],
                 float(cuda_yaw(box["yaw"])), *box["velocity"], class_names.index(box["label"]),
                 box["score"]] for box in document["boxes"]]
        return cls(boxes=np.array(rows, dtype=np.float32).reshape(-1, len(BOX_COLUMNS)),
                   class_names=class_names, stamp_ns=document["stamp_ns"],
                   frame_id=document["frame_id"], stage_ms=document["stage_ms"],
                   cameras_used=tuple(document["cameras_used"]), warnings=tuple(document["warnings"]))

    def transformed(self, target_T_source: np.ndarray, frame_id: str) -> "Detections":
        """The boxes in another frame ``frame_id``, given ``target_T_source`` (float [4, 4], maps
        points of the boxes' frame into it, as :meth:`TransformBuffer.lookup
        <bevfusion_ros.streaming.transforms.TransformBuffer.lookup>` returns it).

        Centres are moved by the rigid transform; headings and velocities are rotated, not
        translated. Boxes stay upright in the target frame (REP-103 frames such as base_link and
        map have z up): the heading is the direction of the box's rotated forward axis in the
        target's xy plane, the velocity the xy part of the rotated (vx, vy, 0). Both are exact
        for a transform that rotates about z only. The result's boxes are float64, so that map
        coordinates far from the origin keep their precision.
        """
        matrix = np.asarray(target_T_source, dtype=np.float64)
        if matrix.shape != (4, 4):
            raise ValueError(f"target_T_source must be a [4, 4] matrix, got {list(matrix.shape)}")
        rotation, translation = matrix[:3, :3], matrix[:3, 3]
        boxes = self.boxes.astype(np.float64)
        heading = self.headings()
        forward = np.stack([np.cos(heading), np.sin(heading), np.zeros_like(heading)], axis=1) @ rotation.T
        velocity = np.pad(boxes[:, [VX, VY]], ((0, 0), (0, 1))) @ rotation.T
        boxes[:, [X, Y, Z]] = boxes[:, [X, Y, Z]] @ rotation.T + translation
        boxes[:, YAW] = cuda_yaw(np.arctan2(forward[:, 1], forward[:, 0]))
        boxes[:, [VX, VY]] = velocity[:, :2]
        return dataclasses.replace(self, boxes=boxes, frame_id=frame_id)

    def to_json(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as a JSON object (see :meth:`from_json`)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> "Detections":
        """Read a file written by :meth:`to_json` back into the CUDA layout."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def corners_lidar(self) -> np.ndarray:
        """Box corners float64 ``[M, 8, 3]`` in the lidar frame.

        Bottom face first (front-left, front-right, rear-right, rear-left), then the top face
        in the same order; "front" is +length/2 along the REP-103 heading, "left" +width/2.
        """
        boxes = self.boxes.astype(np.float64)
        half = boxes[:, [L, W, H]] / 2                                    # [M, 3]
        local = _UNIT_CORNERS[None] * half[:, None]                      # [M, 8, 3]
        heading = self.headings()
        cos, sin = np.cos(heading)[:, None], np.sin(heading)[:, None]
        corners = np.empty_like(local)
        corners[..., 0] = cos * local[..., 0] - sin * local[..., 1]
        corners[..., 1] = sin * local[..., 0] + cos * local[..., 1]
        corners[..., 2] = local[..., 2]
        return corners + boxes[:, None, [X, Y, Z]]
