"""A camera rig: N cameras (any names, one common image size, intrinsics and mounting) around
the lidar, described by a YAML file (``config/rigs/four-camera.yaml`` documents every key).

    rig = load_rig("config/rigs/four-camera.yaml")
    calibration = rig.calibration(image)          # the rig's Calibration for an ImageConfig

The simulator renders scenes for a rig (:mod:`bevfusion_ros.sim`), ``bevfusion-make-scene``,
``bevfusion-train`` and ``bevfusion-export`` take one (``--rig FILE``, ``--cameras NAME,...``),
and :meth:`bevfusion_ros.model.presets.ModelPreset.for_rig` fits a model preset to it.

All cameras share one image size: the pipeline resizes and crops every camera with one
:class:`~bevfusion_ros.config.ImageConfig` (one ``img_aug_matrix``, one upload buffer), so a
rig whose cameras differ in size is refused, naming them.

Mounting, in the lidar frame (REP-103: x forward, y left, z up), either

* ``position: [x, y, z]`` (m) and ``yaw``, ``pitch``, ``roll`` (degrees): the optical axis
  looks along the heading ``yaw`` (counter-clockwise from +x), tilted down by ``pitch``
  (a rotation about the lidar's y axis, which points left), then rolled by ``roll`` about
  itself (positive: the camera's left side goes up): ``R = Rz(yaw) Ry(pitch) Rx(roll) R0``,
  where ``R0`` turns the optical frame (z forward, x right, y down) into x forward, y left,
  z up; or
* ``camera2lidar``: the 4x4 camera(optical) -> lidar transform itself.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from bevfusion_ros.config import ConfigError, ImageConfig
from bevfusion_ros.io.calibration import Calibration, CalibrationError

#: Optical frame (x right, y down, z forward) -> a level camera body looking along +x (columns:
#: the optical axes in x forward, y left, z up).
OPTICAL_TO_FORWARD = np.array([[0.0, 0.0, 1.0],
                               [-1.0, 0.0, 0.0],
                               [0.0, -1.0, 0.0]])
CAMERA_KEYS = frozenset({"name", "image_size", "intrinsics", "position", "yaw", "pitch", "roll",
                         "camera2lidar"})
INTRINSICS_KEYS = ("fx", "fy", "cx", "cy")
MOUNTING_KEYS = frozenset({"position", "yaw", "pitch", "roll"})


class RigError(ConfigError):
    """A rig description is malformed, or does not fit what it is used with."""


def _rotation_z(angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])


def _rotation_y(angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return np.array([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]])


def _rotation_x(angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])


def mounting_transform(position: Sequence[float], yaw_deg: float, pitch_deg: float = 0.0,
                       roll_deg: float = 0.0) -> np.ndarray:
    """camera(optical) -> lidar ``[4, 4]`` float64 of a camera at ``position`` (m, lidar frame)
    with heading ``yaw_deg``, downward tilt ``pitch_deg`` and ``roll_deg`` (module docstring)."""
    rotation = (_rotation_z(np.radians(yaw_deg)) @ _rotation_y(np.radians(pitch_deg))
                @ _rotation_x(np.radians(roll_deg)) @ OPTICAL_TO_FORWARD)
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = position
    return transform


@dataclass(frozen=True)
class RigCamera:
    """One camera: ``width`` x ``height`` pixels, pinhole intrinsics, camera(optical) -> lidar
    transform ``camera2lidar`` (4 rows of 4 floats)."""

    name: str
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    camera2lidar: tuple[tuple[float, ...], ...]

    @property
    def intrinsics(self) -> np.ndarray:
        """K ``[3, 3]`` float64."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @property
    def transform(self) -> np.ndarray:
        """camera2lidar ``[4, 4]`` float64."""
        return np.array(self.camera2lidar, dtype=np.float64)


@dataclass(frozen=True)
class Rig:
    """Named cameras in order (the order of images, calibration and the network's batch)."""

    name: str
    cameras: tuple[RigCamera, ...]

    def __post_init__(self) -> None:
        if not self.cameras:
            raise RigError(f"rig {self.name}: needs at least one camera")
        names = [camera.name for camera in self.cameras]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise RigError(f"rig {self.name}: camera names must be unique, repeated: {repeated}")
        sizes = {camera.name: (camera.width, camera.height) for camera in self.cameras}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{name} {w}x{h}" for name, (w, h) in sizes.items())
            raise RigError(f"rig {self.name}: cameras differ in image size ({listed}); the pipeline "
                           "resizes every camera with one image config, so all cameras of a rig "
                           "need one common size")
        self.calibration(ImageConfig())        # K and mounting valid (any img_aug_matrix will do)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(camera.name for camera in self.cameras)

    @property
    def num_cameras(self) -> int:
        return len(self.cameras)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) shared by every camera."""
        return self.cameras[0].width, self.cameras[0].height

    def intrinsics(self) -> np.ndarray:
        """K ``[N, 3, 3]`` float64 in camera order."""
        return np.stack([camera.intrinsics for camera in self.cameras])

    def camera2lidar(self) -> np.ndarray:
        """camera(optical) -> lidar ``[N, 4, 4]`` float64 in camera order."""
        return np.stack([camera.transform for camera in self.cameras])

    def calibration(self, image: ImageConfig) -> Calibration:
        """The rig's validated :class:`Calibration` with ``image``'s ``img_aug_matrix``."""
        try:
            return Calibration.from_camera2lidar(self.intrinsics(), self.camera2lidar(), image,
                                                 self.camera_names)
        except CalibrationError as error:
            raise RigError(f"rig {self.name}: {error}") from error

    def select(self, names: Sequence[str]) -> "Rig":
        """The rig of the cameras ``names``, in that order; unknown names are a :class:`RigError`."""
        by_name = {camera.name: camera for camera in self.cameras}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise RigError(f"rig {self.name} has no camera(s) {unknown}; its cameras: {list(by_name)}")
        if tuple(names) == self.camera_names:
            return self
        return Rig(self.name, tuple(by_name[name] for name in names))

    def tag(self) -> str:
        """``<name>-<8 hex digits>``, file-name safe; the digits change with any camera's name,
        size, intrinsics or mounting (e.g. a cache folder per rig)."""
        digest = hashlib.sha1(repr(self.cameras).encode()).hexdigest()[:8]
        return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}-{digest}"

    def describe(self) -> str:
        """One line: name, cameras and size."""
        width, height = self.image_size
        return f"rig {self.name}: {self.num_cameras} cameras {list(self.camera_names)}, {width}x{height}"


# ----------------------------------------------------------------------------- YAML
def _numbers(value: Any, count: int, where: str) -> tuple[float, ...]:
    """``value`` as ``count`` finite floats; :class:`RigError` naming ``where`` otherwise."""
    if not isinstance(value, (list, tuple)) or len(value) != count or not all(
            isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
        raise RigError(f"{where}: expected {count} numbers, got {value!r}")
    numbers = tuple(float(item) for item in value)
    if not np.isfinite(numbers).all():
        raise RigError(f"{where}: must be finite, got {value!r}")
    return numbers


def _image_size(value: Any, where: str) -> tuple[int, int]:
    width, height = _numbers(value, 2, f"{where} image_size")
    if width <= 0 or height <= 0 or not width.is_integer() or not height.is_integer():
        raise RigError(f"{where} image_size: expected [width, height] in whole pixels > 0, got {value!r}")
    return int(width), int(height)


def _intrinsics(value: Any, where: str) -> tuple[float, float, float, float]:
    if not isinstance(value, Mapping) or set(value) != set(INTRINSICS_KEYS):
        raise RigError(f"{where} intrinsics: expected a mapping with exactly {list(INTRINSICS_KEYS)}, "
                       f"got {value!r}")
    fx, fy, cx, cy = _numbers([value[key] for key in INTRINSICS_KEYS], 4, f"{where} intrinsics")
    return fx, fy, cx, cy


def _camera2lidar(values: Mapping[str, Any], where: str) -> np.ndarray:
    """The camera's transform from ``camera2lidar`` or from position + yaw/pitch/roll."""
    mounting = MOUNTING_KEYS & set(values)
    if "camera2lidar" in values:
        if mounting:
            raise RigError(f"{where}: give camera2lidar or position + yaw/pitch/roll, not both "
                           f"(found {sorted(mounting)} too)")
        rows = values["camera2lidar"]
        if not isinstance(rows, (list, tuple)) or len(rows) != 4:
            raise RigError(f"{where} camera2lidar: expected 4 rows of 4 numbers, got {rows!r}")
        return np.array([_numbers(row, 4, f"{where} camera2lidar row {index}")
                         for index, row in enumerate(rows)])
    for key in ("position", "yaw"):
        if key not in values:
            raise RigError(f"{where}: missing {key!r} (mounting: position + yaw [+ pitch, roll] "
                           "in degrees, or camera2lidar)")
    position = _numbers(values["position"], 3, f"{where} position")
    yaw, pitch, roll = (_numbers([values.get(key, 0.0)], 1, f"{where} {key}")[0]
                        for key in ("yaw", "pitch", "roll"))
    return mounting_transform(position, yaw, pitch, roll)


def rig_camera_from_dict(values: Mapping[str, Any], where: str) -> RigCamera:
    """One camera entry (the rig's ``defaults`` already merged in)."""
    name = values.get("name")
    if not isinstance(name, str) or not name:
        raise RigError(f"{where}: needs a name (a non-empty string), got {name!r}")
    where = f"{where} ({name})"
    unknown = sorted(set(values) - CAMERA_KEYS)
    if unknown:
        raise RigError(f"{where}: unknown key(s) {unknown}; known: {sorted(CAMERA_KEYS)}")
    for key in ("image_size", "intrinsics"):
        if key not in values:
            raise RigError(f"{where}: missing {key!r} (per camera or in the rig's defaults)")
    width, height = _image_size(values["image_size"], where)
    fx, fy, cx, cy = _intrinsics(values["intrinsics"], where)
    transform = _camera2lidar(values, where)
    return RigCamera(name, width, height, fx, fy, cx, cy,
                     tuple(tuple(float(v) for v in row) for row in transform))


def rig_from_dict(values: Any, source: str = "rig", default_name: str | None = None) -> Rig:
    """A :class:`Rig` from the mapping of a rig YAML: ``name`` (default ``default_name``, else
    ``source``), ``defaults`` (keys every camera takes unless it sets them) and ``cameras`` (a
    list of camera mappings). Errors name ``source`` (e.g. the file)."""
    if not isinstance(values, Mapping):
        raise RigError(f"{source}: the top level must be a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - {"name", "defaults", "cameras"})
    if unknown:
        raise RigError(f"{source}: unknown key(s) {unknown}; known: ['cameras', 'defaults', 'name']")
    defaults = values.get("defaults") or {}
    cameras = values.get("cameras")
    if not isinstance(defaults, Mapping):
        raise RigError(f"{source} defaults: expected a mapping, got {defaults!r}")
    if not isinstance(cameras, list) or not cameras:
        raise RigError(f"{source}: 'cameras' must be a non-empty list, got {cameras!r}")
    for index, camera in enumerate(cameras):
        if not isinstance(camera, Mapping):
            raise RigError(f"{source} camera {index}: expected a mapping, got {camera!r}")
    entries = [{**defaults, **camera} for camera in cameras]
    name = values.get("name", default_name or source)
    if not isinstance(name, str) or not name:
        raise RigError(f"{source} name: expected a non-empty string, got {name!r}")
    return Rig(name, tuple(rig_camera_from_dict(entry, f"{source} camera {index}")
                           for index, entry in enumerate(entries)))


def load_rig(path: str | Path) -> Rig:
    """Read a rig YAML (module docstring); :class:`RigError` names the file and what is wrong."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise RigError(f"cannot read rig file {path}: {error}") from error
    return rig_from_dict(values, str(path), default_name=path.stem)


def parse_camera_names(text: str) -> tuple[str, ...]:
    """``"FRONT,BACK"`` -> ``("FRONT", "BACK")``; spaces around names are ignored."""
    names = tuple(part.strip() for part in text.split(","))
    if not all(names):
        raise RigError(f"camera list {text!r}: expected NAME,NAME,... without empty names")
    return names
