"""A generated scene and its distorted twin, and how their boxes compare: shared by the pipeline,
node and GPU tests of undistortion (``from twin_boxes import ...``: test/ is on sys.path).

The twin is the scene as cameras with :data:`LENSES` would have recorded it
(:func:`~bevfusion_ros.camera.undistort.distorted_frame`: OpenCV's inverse mapping). Undistorted,
its network input differs from the scene's by the blur of a second bilinear interpolation (mean
~0.4 grey levels): on the trained tiny-synthetic model the confident boxes moved by 0.007 m and
0.003 in score (CPU), while the same images left distorted move them by 0.13 m and 0.05.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bevfusion_ros.camera.undistort import distorted_frame
from bevfusion_ros.config import ImageConfig
from bevfusion_ros.io.distortion import Distortion
from bevfusion_ros.io.frame import Frame
from bevfusion_ros.sim.scene import generate_scene

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-synthetic"
SEED = 100000                     # a held-out scene (the model trained on seeds 0-17999)
BARREL = Distortion("plumb_bob", (-0.25, 0.07, 0.0005, -0.0005, 0.0))
#: Four of the six cameras distorted, with each model; two left undistorted.
LENSES = (BARREL, None, Distortion("rational_polynomial", (0.2, -0.05, 0.001, 0.001, 0.01, 0.5, -0.02, 0.03)),
          Distortion("equidistant", (0.05, -0.02, 0.01, -0.002)), BARREL, None)
CONFIDENT = 0.3
CENTER_TOLERANCE_M = 0.03
SIZE_TOLERANCE_M = 0.03
SCORE_TOLERANCE = 0.015


def scene_twins(image: ImageConfig) -> tuple[Frame, Frame]:
    """(undistorted frame, its distorted twin) of scene :data:`SEED`, calibrated for ``image``."""
    scene = generate_scene(SEED)
    frame = Frame(scene.images, scene.points, scene.calibration.for_image(image))
    return frame, distorted_frame(frame, LENSES)


def twin_errors(boxes: np.ndarray, twin: np.ndarray) -> np.ndarray:
    """Per confident twin box (score >= CONFIDENT; CUDA box layout), against the box of the same
    label nearest to it: ``[centre distance m, max size difference m, |score difference|]``."""
    errors = []
    for box in twin[twin[:, 10] >= CONFIDENT]:
        same_label = np.flatnonzero(boxes[:, 9] == box[9])
        if same_label.size == 0:
            errors.append((np.inf, np.inf, np.inf))
            continue
        nearest = boxes[same_label[np.argmin(np.linalg.norm(boxes[same_label, :3] - box[:3], axis=1))]]
        errors.append((np.linalg.norm(nearest[:3] - box[:3]), np.abs(nearest[3:6] - box[3:6]).max(),
                       abs(nearest[10] - box[10])))
    return np.array(errors).reshape(-1, 3)


def within_twin_tolerance(errors: np.ndarray) -> bool:
    return bool((errors[:, 0] <= CENTER_TOLERANCE_M).all() and (errors[:, 1] <= SIZE_TOLERANCE_M).all()
                and (errors[:, 2] <= SCORE_TOLERANCE).all())


def assert_twin_boxes(boxes: np.ndarray, twin: np.ndarray) -> None:
    """``boxes`` (CUDA layout) are the twin's confident boxes within tolerance."""
    errors = twin_errors(boxes, twin)
    assert len(errors) >= 10, "the scene should give confident boxes"
    assert within_twin_tolerance(errors), errors.max(axis=0)
