"""Ground truth of one frame, and its text form inside a bag.

A bag of generated scenes (``bevfusion-make-bag --seeds``) carries each scene's ground truth in
an MCAP metadata record named :data:`GROUND_TRUTH_RECORD`: key = the frame's lidar stamp (ns,
decimal), value = :func:`truth_to_text` (JSON: boxes in the CUDA layout, labels, lidar points per
box). ``bevfusion-batch --eval`` reads it back (:func:`truth_from_text`) and evaluates each frame
it detected against the truth of the same stamp, as ``bevfusion-eval`` does for the scenes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bevfusion_ros.sim.scene import Scene

#: The MCAP metadata record (name) holding a bag's ground truth by lidar stamp.
GROUND_TRUTH_RECORD = "bevfusion_ros.ground_truth"
#: rosbag2 custom_data key of a generated-scenes bag: its seeds (``A:B`` or comma-separated).
SCENE_SEEDS_KEY = "bevfusion_ros.scene_seeds"


class GroundTruthError(ValueError):
    """A ground-truth record that cannot be read."""


@dataclass(frozen=True)
class FrameTruth:
    """boxes float32 ``[M, 9]`` (x, y, z, w, l, h, yaw, vx, vy: CUDA layout), labels int64
    ``[M]`` (class indices), num_points int64 ``[M]`` (lidar points on each box)."""

    boxes: np.ndarray
    labels: np.ndarray
    num_points: np.ndarray

    @classmethod
    def of_scene(cls, scene: Scene) -> "FrameTruth":
        """A generated scene's boxes, labels and the lidar hits on each box."""
        hits = scene.point_objects[scene.point_objects >= 0]
        counts = np.bincount(hits, minlength=len(scene.gt_boxes))[:len(scene.gt_boxes)]
        return cls(scene.gt_boxes, scene.gt_labels, counts.astype(np.int64))

    def for_eval(self, keep_empty: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(boxes, labels, points per box or None with ``keep_empty``): one frame's ground truth
        as :func:`bevfusion_ros.analysis.evaluation.evaluate` takes it."""
        return self.boxes, self.labels, None if keep_empty else self.num_points


def truth_to_text(truth: FrameTruth) -> str:
    """JSON of ``truth`` (float32 values written exactly: they read back bit for bit)."""
    return json.dumps({"boxes": np.asarray(truth.boxes, np.float32).tolist(),
                       "labels": np.asarray(truth.labels, np.int64).tolist(),
                       "num_points": np.asarray(truth.num_points, np.int64).tolist()})


def truth_from_text(text: str) -> FrameTruth:
    """Inverse of :func:`truth_to_text`; :class:`GroundTruthError` on malformed text."""
    try:
        document: Any = json.loads(text)
        boxes = np.asarray(document["boxes"], np.float32).reshape(-1, 9)
        labels = np.asarray(document["labels"], np.int64).reshape(-1)
        num_points = np.asarray(document["num_points"], np.int64).reshape(-1)
    except (ValueError, TypeError, KeyError) as error:
        raise GroundTruthError(f"unreadable ground-truth record: {error}") from error
    if not len(boxes) == len(labels) == len(num_points):
        raise GroundTruthError(f"ground truth has {len(boxes)} boxes, {len(labels)} labels and "
                               f"{len(num_points)} point counts")
    return FrameTruth(boxes, labels, num_points)


def truth_record(truths: dict[int, FrameTruth]) -> dict[str, str]:
    """``{stamp ns: truth}`` as the values of a :data:`GROUND_TRUTH_RECORD` record."""
    return {str(stamp): truth_to_text(truth) for stamp, truth in truths.items()}


def truths_from_record(record: dict[str, str]) -> dict[int, FrameTruth]:
    """Inverse of :func:`truth_record`."""
    try:
        return {int(stamp): truth_from_text(text) for stamp, text in record.items()}
    except ValueError as error:
        raise GroundTruthError(f"ground-truth record: {error}") from error
