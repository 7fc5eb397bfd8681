"""Per-camera calibration matrices in CUDA-BEVFusion's convention (pipeline spec 1.5).

All matrices are float64 ``[N, 4, 4]`` arrays, one per camera in ``camera_names`` order:

* ``camera2lidar``      camera -> lidar rigid transform ``[R | t]``;
* ``lidar2camera``      its inverse;
* ``camera_intrinsics`` K in the upper-left 3x3, identity elsewhere;
* ``lidar2image``       ``camera_intrinsics @ lidar2camera`` (row 2 gives camera-frame depth);
* ``img_aug_matrix``    original image pixels (u, v, d) -> network-input pixels (spec 1.3);
* ``distortions``       per camera, its lens :class:`~bevfusion_ros.io.distortion.Distortion` or None
  (empty: no camera is distorted). K is the matrix of the *undistorted* image: the pipeline
  undistorts with new camera matrix K (:mod:`bevfusion_ros.camera.undistort`).

:meth:`Calibration.validate` checks every invariant and names the offending camera.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from bevfusion_ros.config import NUSCENES_CAMERA_NAMES, ConfigError, ImageConfig, PipelineConfig
from bevfusion_ros.io.distortion import Distortion, DistortionError, distortion_from
from bevfusion_ros.io.tensor import read_tensor
from bevfusion_ros.streaming.transforms import transform_from_translation_quaternion

MATRIX_NAMES = ("camera2lidar", "lidar2camera", "camera_intrinsics", "lidar2image", "img_aug_matrix")
RIGID_TOLERANCE = 1e-4     # |R^T R - I|, |lidar2camera @ camera2lidar - I|
PROJECTION_TOLERANCE = 1e-4  # relative error of lidar2image against K @ lidar2camera


class CalibrationError(ValueError):
    """Calibration matrices are malformed or inconsistent."""


def img_aug_matrix_from_config(image: ImageConfig) -> np.ndarray:
    """Test-time augmentation matrix ``[4, 4]``: scale by ``resize_scale``, shift by -crop."""
    crop_x, crop_y = image.crop
    matrix = np.eye(4)
    matrix[0, 0] = matrix[1, 1] = image.resize_scale
    matrix[0, 3], matrix[1, 3] = -crop_x, -crop_y
    return matrix


def pose_matrix(translation: Sequence[float], rotation_wxyz: Sequence[float]) -> np.ndarray:
    """Homogeneous ``[4, 4]`` transform from a translation and a (w, x, y, z) quaternion."""
    w, x, y, z = rotation_wxyz
    return transform_from_translation_quaternion(translation, (x, y, z, w))


def intrinsics_4x4(intrinsics: np.ndarray) -> np.ndarray:
    """Pad K ``[N, 3, 3]`` to ``[N, 4, 4]`` with identity, as CUDA-BEVFusion stores it."""
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    padded = np.tile(np.eye(4), (intrinsics.shape[0], 1, 1))
    padded[:, :3, :3] = intrinsics
    return padded


@dataclass(frozen=True)
class Calibration:
    """Camera/lidar calibration for one rig; build it with a ``from_*`` constructor."""

    camera_names: tuple[str, ...]
    camera2lidar: np.ndarray
    lidar2camera: np.ndarray
    camera_intrinsics: np.ndarray
    lidar2image: np.ndarray
    img_aug_matrix: np.ndarray
    distortions: tuple[Distortion | None, ...] = ()

    @property
    def num_cameras(self) -> int:
        return len(self.camera_names)

    def distortion(self, index: int) -> Distortion | None:
        """The lens distortion of camera ``index`` (None: not distorted)."""
        return self.distortions[index] if self.distortions else None

    @property
    def distorted(self) -> bool:
        """Whether any camera has a lens distortion to undo."""
        return any(distortion is not None for distortion in self.distortions)

    @classmethod
    def from_camera2lidar(cls, camera_intrinsics: np.ndarray, camera2lidar: np.ndarray,
                          image: ImageConfig, camera_names: Sequence[str],
                          distortions: Sequence[Distortion | None] = ()) -> "Calibration":
        """Derive every matrix from K ``[N, 3, 3]`` and camera->lidar ``[N, 4, 4]`` (one TF lookup);
        ``distortions``: one per camera (None: not distorted), or none at all.

        This is the consistent way to build a calibration: lidar2camera is the exact inverse
        and lidar2image the exact product, so the two cannot disagree.
        """
        camera2lidar = np.asarray(camera2lidar, dtype=np.float64)
        intrinsics = intrinsics_4x4(camera_intrinsics)
        lidar2camera = np.linalg.inv(camera2lidar)
        count = camera2lidar.shape[0]
        distortions = tuple(distortions)
        if len(distortions) == count and all(distortion is None for distortion in distortions):
            distortions = ()
        calibration = cls(
            camera_names=tuple(camera_names),
            camera2lidar=camera2lidar,
            lidar2camera=lidar2camera,
            camera_intrinsics=intrinsics,
            lidar2image=intrinsics @ lidar2camera,
            img_aug_matrix=np.tile(img_aug_matrix_from_config(image), (count, 1, 1)),
            distortions=distortions,
        )
        return calibration.validate()

    def for_image(self, image: ImageConfig) -> "Calibration":
        """The same rig for another image pre-processing: every matrix rebuilt from K and
        camera2lidar with ``image``'s ``img_aug_matrix`` (what a model that resizes differently,
        e.g. the tiny preset, must be given)."""
        return Calibration.from_camera2lidar(self.camera_intrinsics[:, :3, :3], self.camera2lidar, image,
                                             self.camera_names, self.distortions)

    @classmethod
    def from_nuscenes(cls, camera_intrinsics: np.ndarray,
                      camera2ego: Sequence[tuple[Sequence[float], Sequence[float]]],
                      lidar2ego: tuple[Sequence[float], Sequence[float]],
                      image: ImageConfig,
                      camera_names: Sequence[str] = NUSCENES_CAMERA_NAMES,
                      camera_ego2global: Sequence[np.ndarray] | None = None,
                      lidar_ego2global: np.ndarray | None = None) -> "Calibration":
        """Build from nuScenes ``calibrated_sensor`` records: (translation, rotation wxyz) pairs.

        When the ego poses at each camera's and at the lidar's timestamp are given
        (``ego_pose`` records as ``[4, 4]``), camera->lidar goes through the global frame and
        includes ego motion between the timestamps, exactly as BEVFusion's converter does;
        otherwise the static rig transform ``inv(lidar2ego) @ camera2ego`` is used.
        """
        lidar_to_ego = pose_matrix(*lidar2ego)
        transforms = []
        for index, (translation, rotation) in enumerate(camera2ego):
            camera_to_ego = pose_matrix(translation, rotation)
            if camera_ego2global is not None and lidar_ego2global is not None:
                camera_to_global = np.asarray(camera_ego2global[index]) @ camera_to_ego
                global_to_lidar = np.linalg.inv(np.asarray(lidar_ego2global) @ lidar_to_ego)
                transforms.append(global_to_lidar @ camera_to_global)
            else:
                transforms.append(np.linalg.inv(lidar_to_ego) @ camera_to_ego)
        return cls.from_camera2lidar(camera_intrinsics, np.stack(transforms), image, camera_names)

    @classmethod
    def from_example_data(cls, directory: str | Path,
                          camera_names: Sequence[str] = NUSCENES_CAMERA_NAMES) -> "Calibration":
        """Load the ``*.tensor`` matrices of a CUDA-BEVFusion example-data folder ([1, N, 4, 4])."""
        directory = Path(directory)
        matrices = {}
        for name in MATRIX_NAMES:
            path = directory / f"{name}.tensor"
            if not path.is_file():
                raise CalibrationError(f"{directory}: missing calibration file {path.name}")
            array = read_tensor(path).astype(np.float64)
            matrices[name] = array[0] if array.ndim == 4 and array.shape[0] == 1 else array
        return cls(camera_names=tuple(camera_names), **matrices).validate()

    def validate(self) -> "Calibration":
        """Check shapes, finiteness, rigid transforms, intrinsics and consistency; return self."""
        count = self.num_cameras
        if count == 0:
            raise CalibrationError("calibration has no cameras")
        for name in MATRIX_NAMES:
            matrix = getattr(self, name)
            if matrix.shape != (count, 4, 4):
                raise CalibrationError(f"{name} has shape {list(matrix.shape)}, expected "
                                       f"[{count}, 4, 4] for cameras {list(self.camera_names)}")
        if len(self.distortions) not in (0, count) or not all(
                distortion is None or isinstance(distortion, Distortion) for distortion in self.distortions):
            raise CalibrationError(f"distortions must be one Distortion or None per camera "
                                   f"({list(self.camera_names)}) or empty, got {list(self.distortions)}")
        for index in range(count):
            self._validate_camera(index)
        return self

    def _validate_camera(self, index: int) -> None:
        def fail(message: str) -> None:
            raise CalibrationError(f"camera {index} ({self.camera_names[index]}): {message}")

        for name in MATRIX_NAMES:
            matrix = getattr(self, name)[index]
            if not np.isfinite(matrix).all():
                fail(f"{name} contains NaN or inf")
            if np.abs(matrix[3] - (0, 0, 0, 1)).max() > 1e-6:
                fail(f"{name} bottom row is {matrix[3].tolist()}, expected [0, 0, 0, 1]")
        rotation = self.camera2lidar[index, :3, :3]
        orthogonality = np.abs(rotation.T @ rotation - np.eye(3)).max()
        if orthogonality > RIGID_TOLERANCE or np.linalg.det(rotation) <= 0:
            fail(f"camera2lidar rotation is not a proper rotation (|R^T R - I| = {orthogonality:.3g}, "
                 f"det = {np.linalg.det(rotation):.3g})")
        inverse_error = np.abs(self.lidar2camera[index] @ self.camera2lidar[index] - np.eye(4)).max()
        if inverse_error > RIGID_TOLERANCE:
            fail(f"lidar2camera is not the inverse of camera2lidar (error {inverse_error:.3g})")
        intrinsics = self.camera_intrinsics[index]
        if intrinsics[0, 0] <= 0 or intrinsics[1, 1] <= 0:
            fail(f"camera_intrinsics focal lengths must be positive, got fx={intrinsics[0, 0]}, "
                 f"fy={intrinsics[1, 1]}")
        padding = np.concatenate([intrinsics[2] - (0, 0, 1, 0), intrinsics[:2, 3], intrinsics[1, :1]])
        if np.abs(padding).max() > 1e-6:
            fail("camera_intrinsics must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]] padded with identity")
        projection = intrinsics @ self.lidar2camera[index]
        relative = np.abs(self.lidar2image[index] - projection) / np.maximum(1.0, np.abs(projection))
        if relative.max() > PROJECTION_TOLERANCE:
            fail(f"lidar2image differs from camera_intrinsics @ lidar2camera "
                 f"(max relative error {relative.max():.3g} > {PROJECTION_TOLERANCE})")
        augmentation = self.img_aug_matrix[index]
        if np.abs(augmentation[2] - (0, 0, 1, 0)).max() > 1e-6 or \
                abs(np.linalg.det(augmentation[:2, :2])) < 1e-9:
            fail("img_aug_matrix must scale/rotate u, v with an invertible 2x2 block and keep depth "
                 "(row 2 = [0, 0, 1, 0])")

    def projection_error(self) -> float:
        """Max relative difference between lidar2image and camera_intrinsics @ lidar2camera."""
        projection = self.camera_intrinsics @ self.lidar2camera
        return float((np.abs(self.lidar2image - projection) / np.maximum(1.0, np.abs(projection))).max())


def _distortions_from_yaml(values: dict) -> list[Distortion | None]:
    """The optional ``distortions`` of a calibration YAML: per camera null or
    ``{model: plumb_bob, coefficients: [...]}`` (:func:`~bevfusion_ros.io.distortion.distortion_from`)."""
    return [None if entry is None else distortion_from(entry["model"], entry["coefficients"])
            for entry in values.get("distortions") or []]


def calibration_from_yaml(path: Path, config: PipelineConfig) -> Calibration:
    """A calibration YAML: ``camera_names`` (optional, default the config's),
    ``camera_intrinsics`` [N][3][3], ``camera2lidar`` [N][4][4] and, optionally, ``distortions``
    (per camera null or ``{model, coefficients}``, as a CameraInfo's ``distortion_model`` and ``d``)."""
    import yaml
    try:
        values = yaml.safe_load(path.read_text())
        names = values.get("camera_names", list(config.camera_names))
        return Calibration.from_camera2lidar(np.array(values["camera_intrinsics"], dtype=np.float64),
                                             np.array(values["camera2lidar"], dtype=np.float64),
                                             config.image, names, _distortions_from_yaml(values))
    except (OSError, KeyError, TypeError, AttributeError, DistortionError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read calibration file {path}: {error!r}") from error
