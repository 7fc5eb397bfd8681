"""The synthetic sensor rigs: one roof lidar and pinhole cameras (:class:`~bevfusion_ros.io.rig.Rig`).

:data:`SYNTHETIC_RIG` is the default, nuScenes-like one. Its numbers are made up for the
simulator (they are *not* taken from the nuScenes files):

* lidar frame: x forward, y left, z up, origin at the lidar, mounted :data:`LIDAR_HEIGHT`
  (1.84 m) above the ground, so the ground plane is ``z = -1.84``;
* six 1600x900 pinhole cameras, fx = fy = 1260, cx = 800, cy = 450, no distortion, optical
  frames (z forward, x right, y down), level (no pitch or roll), looking along the REP-103
  headings of :data:`CAMERA_HEADINGS_DEG`, :data:`CAMERA_HEIGHT` (1.5 m) above the ground and
  a few decimetres from the lidar (:data:`CAMERA_OFFSETS`).

The horizontal field of view is 2 atan(800 / 1260) = 64.8 deg, so neighbouring cameras 55 deg
apart overlap; between BACK_LEFT/BACK_RIGHT (+-110) and BACK (180) a 5 deg wedge is unseen.

Any other rig renders too: a rig YAML (``config/rigs/*.yaml``, :func:`bevfusion_ros.io.rig.load_rig`)
with the same lidar; :func:`select_rig` is what the tools' ``--rig FILE`` / ``--cameras A,B``
options select.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from bevfusion_ros.config import NUSCENES_CAMERA_NAMES, ImageConfig
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.rig import Rig, RigCamera, load_rig, mounting_transform, parse_camera_names

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


def _synthetic_camera(name: str) -> RigCamera:
    transform = mounting_transform((*CAMERA_OFFSETS[name], CAMERA_HEIGHT - LIDAR_HEIGHT),
                                   CAMERA_HEADINGS_DEG[name])
    return RigCamera(name, IMAGE_WIDTH, IMAGE_HEIGHT, FOCAL_LENGTH, FOCAL_LENGTH, *PRINCIPAL_POINT,
                     tuple(tuple(row) for row in transform.tolist()))


#: The six nuScenes-named cameras in CUDA-BEVFusion order (module docstring).
SYNTHETIC_RIG = Rig("synthetic-nuscenes", tuple(_synthetic_camera(name) for name in NUSCENES_CAMERA_NAMES))


def synthetic_rig(camera_names: Sequence[str] = NUSCENES_CAMERA_NAMES
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(K [N, 3, 3], camera2lidar [N, 4, 4])`` float64 of :data:`SYNTHETIC_RIG`'s cameras
    ``camera_names`` (default: all six, in CUDA-BEVFusion order)."""
    rig = SYNTHETIC_RIG.select(camera_names)
    return rig.intrinsics(), rig.camera2lidar()


def default_image_config(rig: Rig) -> ImageConfig:
    """The default :class:`ImageConfig` (704x256 network input) for the rig's image size."""
    return ImageConfig().for_input_size(*rig.image_size)


def synthetic_calibration(image: ImageConfig | None = None,
                          camera_names: Sequence[str] = NUSCENES_CAMERA_NAMES) -> Calibration:
    """:data:`SYNTHETIC_RIG`'s cameras ``camera_names`` as a validated :class:`Calibration`
    (default :class:`ImageConfig`: 1600x900 input)."""
    return rig_calibration(SYNTHETIC_RIG.select(camera_names), image)


def rig_calibration(rig: Rig, image: ImageConfig | None = None) -> Calibration:
    """``rig``'s calibration with ``image``'s ``img_aug_matrix`` (default: :func:`default_image_config`)."""
    return rig.calibration(image or default_image_config(rig))


#: Help of the tools' ``--rig`` and ``--cameras`` options (what :func:`select_rig` takes).
RIG_OPTION_HELP = "rig YAML of the cameras (config/rigs/*.yaml; default the synthetic nuScenes rig)"
CAMERAS_OPTION_HELP = "cameras of the rig, NAME,NAME,... in this order (default all)"


def add_rig_options(parser: argparse.ArgumentParser) -> None:
    """``--rig FILE`` and ``--cameras NAME,NAME,...`` (:func:`select_rig` of their values)."""
    parser.add_argument("--rig", type=Path, metavar="RIG.yaml", help=RIG_OPTION_HELP)
    parser.add_argument("--cameras", metavar="NAME,NAME,...", help=CAMERAS_OPTION_HELP)


def select_rig(rig_file: str | Path | Rig | None = None, cameras: str | Sequence[str] | None = None) -> Rig:
    """The rig of the tools' ``--rig FILE`` (a path or a loaded :class:`Rig`; default
    :data:`SYNTHETIC_RIG`) and ``--cameras NAME,NAME,...`` (a subset of its cameras, in that
    order; default all)."""
    rig = rig_file if isinstance(rig_file, Rig) else load_rig(rig_file) if rig_file else SYNTHETIC_RIG
    if cameras:
        rig = rig.select(parse_camera_names(cameras) if isinstance(cameras, str) else tuple(cameras))
    return rig


def lidar2ego() -> np.ndarray:
    """lidar -> ego ``[4, 4]``: ego origin on the ground below the rear axle, 0.9 m behind the lidar."""
    matrix = np.eye(4)
    matrix[:3, 3] = (0.9, 0.0, LIDAR_HEIGHT)
    return matrix
