"""One synchronized sensor frame: an RGB image per camera, a lidar sweep and the calibration."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from bevfusion_ros.config import ImageConfig
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.tensor import read_tensor


class FrameError(ValueError):
    """A frame's images or points do not have the expected form."""


@dataclass(frozen=True)
class Frame:
    """Sensor data for one inference.

    images:      list of ``[H, W, 3]`` uint8 RGB arrays, one per camera, calibration order;
    points:      ``[N, C]`` float32 lidar points, columns x, y, z (m, lidar frame), intensity
                 (0-255), time lag (s) and optionally more;
    calibration: the rig's :class:`Calibration`;
    lidar_stamp_ns: acquisition time of the lidar sweep in nanoseconds (0 when unknown).
    """

    images: list[np.ndarray]
    points: np.ndarray
    calibration: Calibration
    lidar_stamp_ns: int = 0
    token: str = ""

    def __post_init__(self) -> None:
        if len(self.images) != self.calibration.num_cameras:
            raise FrameError(f"frame has {len(self.images)} images but the calibration has "
                             f"{self.calibration.num_cameras} cameras")
        for name, image in zip(self.calibration.camera_names, self.images):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise FrameError(f"camera {name}: expected an [H, W, 3] uint8 RGB image, "
                                 f"got {image.dtype} {list(image.shape)}")
        if self.points.ndim != 2 or self.points.shape[1] < 4:
            raise FrameError(f"points must be [N, C>=4] (x, y, z, intensity, ...), "
                             f"got {list(self.points.shape)}")


@functools.lru_cache(maxsize=8)
def black_image(image: ImageConfig) -> np.ndarray:
    """A read-only all-zero ``[H, W, 3]`` uint8 input image of ``image``'s input size, one shared
    array per size: what the pipeline feeds a camera that is missing."""
    black = np.zeros((image.input_height, image.input_width, 3), dtype=np.uint8)
    black.flags.writeable = False
    return black


def read_rgb_image(path: str | Path) -> np.ndarray:
    """Decode an image file to ``[H, W, 3]`` uint8 RGB (OpenCV decodes BGR; we swap)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FrameError(f"cannot decode image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


EXAMPLE_IMAGE = re.compile(r"^(\d+)-(.+)\.jpg$")


def example_camera_names(directory: str | Path) -> tuple[str, ...]:
    """The cameras of an example-data folder: ``NAME`` of its ``{i}-{NAME}.jpg`` files in the
    order of ``i`` (0, 1, ... without gaps), e.g. the six nuScenes names of NVIDIA's folder."""
    found: dict[int, list[str]] = {}
    for path in Path(directory).iterdir():
        match = EXAMPLE_IMAGE.match(path.name)
        if match:
            found.setdefault(int(match.group(1)), []).append(match.group(2))
    files = _image_files(directory)
    if not found:
        raise FrameError(f"{directory}: no camera images 0-NAME.jpg, 1-NAME.jpg, ... (found {files})")
    gaps = [index for index in range(max(found)) if index not in found]
    if gaps:
        raise FrameError(f"{directory}: missing camera image {gaps[0]}-NAME.jpg (images are numbered "
                         f"0, 1, ... without gaps); the folder has {files}")
    repeated = [f"{index}-{name}.jpg" for index, names in sorted(found.items()) if len(names) > 1
                for name in names]
    if repeated:
        raise FrameError(f"{directory}: one image per camera index, found {repeated}")
    return tuple(found[index][0] for index in range(len(found)))


def _image_files(directory: str | Path) -> list[str]:
    return sorted(path.name for path in Path(directory).glob("*.jpg"))


def load_example_data(directory: str | Path, camera_names: Sequence[str] | None = None) -> Frame:
    """Load a CUDA-BEVFusion example-data folder (``0-FRONT.jpg`` ... ``points.tensor``) of the
    cameras ``camera_names`` (default the folder's own, :func:`example_camera_names`).

    Images come back RGB in camera order, points as float32 ``[N, 5]`` (exact widening of
    the file's fp16 values), calibration validated. The stamp is unknown (0) in this format.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FrameError(f"example-data folder {directory} does not exist")
    camera_names = example_camera_names(directory) if camera_names is None else tuple(camera_names)
    images = []
    for index, name in enumerate(camera_names):
        path = directory / f"{index}-{name}.jpg"
        if not path.is_file():
            raise FrameError(f"{directory}: missing camera image {path.name} of the {len(camera_names)} "
                             f"cameras {list(camera_names)}; the folder has {_image_files(directory)}")
        images.append(read_rgb_image(path))
    points_path = directory / "points.tensor"
    if not points_path.is_file():
        raise FrameError(f"{directory}: missing points.tensor")
    token_path = directory / "token.txt"
    return Frame(
        images=images,
        points=read_tensor(points_path).astype(np.float32),
        calibration=Calibration.from_example_data(directory, camera_names),
        token=token_path.read_text().strip() if token_path.is_file() else "",
    )
