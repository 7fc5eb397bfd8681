"""A synthetic nuScenes-like sensor rig: one roof lidar and six pinhole cameras.

The numbers are made up for the simulator (they are *not* taken from the nuScenes files):

* lidar frame: x forward, y left, z up, origin at the lidar, mounted :data:`LIDAR_HEIGHT`
  (1.84 m) above the ground, so the ground plane is ``z = -1.84``;
* six 1600x900 pinhole cameras, fx = fy = 1260, cx = 800, cy = 450, no distortion, optical
  frames (z forward, x right, y down), level (no pitch or roll), looking along the REP-103
  headings of :data:`CAMERA_HEADINGS_DEG`, :data:`CAMERA_HEIGHT` (1.5 m) above the ground and
  a few decimetres from the lidar (:data:`CAMERA_OFFSETS`).

The horizontal field of view is 2 atan(800 / 1260) = 64.8 deg, so neighbouring cameras 55 deg
apart overlap; between BACK_LEFT/BACK_RIGHT (+-110) and BACK (180) a 5 deg wedge is unseen.
"""
from __future__ import annotations

import numpy as np

from bevfusion_ros.config import NUSCENES_CAMERA_NAMES, ImageConfig
from bevfusion_ros.io.calibration import Calibration

LIDAR_HEIGHT = 1.84            # m, lidar origin above the ground
GROUND_Z = -LIDAR_HEIGHT       # ground plane in the lidar frame
CAMERA_HEIGHT = 1.5            # m above the ground
IMAGE_WIDTH, IMAGE_HEIGHT = 1600, 900
FOCAL_LENGTH = 1260.0
PRINCIPAL_POINT = (800.0, 450.0)

# REP-103 heading of each optical axis (counter-clockwise from the lidar's +x), degrees.
CAMERA_HEADINGS_DEG: dict[str, float] = {
    "FRONT": 0.0, "FRONT_RIGHT": -55.0, "FRONT_LEFT": 55.0,
    "BACK": 180.0, "BACK_LEFT": 110.0, "BACK_RIGHT": -110.0,
}
# Horizontal (x, y) position of each camera in the lidar frame, metres.
CAMERA_OFFSETS: dict[str, tuple[float, float]] = {
    "FRONT": (0.60, 0.00), "FRONT_RIGHT": (0.50, -0.45), "FRONT_LEFT": (0.50, 0.45),
    "BACK": (-0.90, 0.00), "BACK_LEFT": (-0.35, 0.50), "BACK_RIGHT": (-0.35, -0.50),
}


def camera_intrinsics() -> np.ndarray:
    """K ``[3, 3]`` shared by the six synthetic cameras."""
    return np.array([[FOCAL_LENGTH, 0.0, PRINCIPAL_POINT[0]],
                     [0.0, FOCAL_LENGTH, PRINCIPAL_POINT[1]],
                     [0.0, 0.0, 1.0]])


def optical_to_lidar_rotation(heading: float) -> np.ndarray:
    """Rotation ``[3, 3]`` of a level optical frame looking along REP-103 ``heading`` (rad).

    Columns are the optical axes in the lidar frame: x right, y down, z forward.
    """
    cos, sin = np.cos(heading), np.sin(heading)
    return np.array([[sin, 0.0, cos],
                     [-cos, 0.0, sin],
                     [0.0, -1.0, 0.0]])


def synthetic_rig(camera_names: tuple[str, ...] = NUSCENES_CAMERA_NAMES
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(K [N, 3, 3], camera2lidar [N, 4, 4])`` float64 for ``camera_names`` (default: the six
    nuScenes names in CUDA-BEVFusion order)."""
    intrinsics = np.tile(camera_intrinsics(), (len(camera_names), 1, 1))
    camera2lidar = np.tile(np.eye(4), (len(camera_names), 1, 1))
    for index, name in enumerate(camera_names):
        if name not in CAMERA_HEADINGS_DEG:
            raise ValueError(f"unknown synthetic camera {name!r}; known: {list(CAMERA_HEADINGS_DEG)}")
        camera2lidar[index, :3, :3] = optical_to_lidar_rotation(np.radians(CAMERA_HEADINGS_DEG[name]))
        camera2lidar[index, :3, 3] = (*CAMERA_OFFSETS[name], CAMERA_HEIGHT - LIDAR_HEIGHT)
    return intrinsics, camera2lidar


def synthetic_calibration(image: ImageConfig | None = None,
                          camera_names: tuple[str, ...] = NUSCENES_CAMERA_NAMES) -> Calibration:
    """The rig as a validated :class:`Calibration` (default :class:`ImageConfig`: 1600x900 input)."""
    intrinsics, camera2lidar = synthetic_rig(camera_names)
    return Calibration.from_camera2lidar(intrinsics, camera2lidar, image or ImageConfig(), camera_names)


def lidar2ego() -> np.ndarray:
    """lidar -> ego ``[4, 4]``: ego origin on the ground below the rear axle, 0.9 m behind the lidar."""
    matrix = np.eye(4)
    matrix[:3, 3] = (0.9, 0.0, LIDAR_HEIGHT)
    return matrix
