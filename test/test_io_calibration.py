"""Calibration construction and validation against independent float64 formulas; lens distortions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from bevfusion_ros.config import ImageConfig
from bevfusion_ros.io.calibration import Calibration, CalibrationError, pose_matrix
from bevfusion_ros.io.distortion import Distortion, DistortionError, distortion_from
from bevfusion_ros.io.tensor import read_tensor, write_tensor

NAMES = ("FRONT", "FRONT_RIGHT", "FRONT_LEFT", "BACK", "BACK_LEFT", "BACK_RIGHT")


def rodrigues(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation about a unit axis by Rodrigues' formula (independent of quaternions)."""
    axis = axis / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def random_pose(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(translation, quaternion wxyz, rotation matrix) of a random rigid transform."""
    axis, angle = rng.standard_normal(3), rng.uniform(-math.pi, math.pi)
    unit = axis / np.linalg.norm(axis)
    quaternion = np.concatenate([[math.cos(angle / 2)], math.sin(angle / 2) * unit])
    return rng.uniform(-3, 3, 3), quaternion, rodrigues(axis, angle)


def synthetic_rig(rng, count=6):
    intrinsics = np.zeros((count, 3, 3))
    intrinsics[:, 0, 0] = intrinsics[:, 1, 1] = rng.uniform(500, 1500, count)
    intrinsics[:, 0, 2], intrinsics[:, 1, 2], intrinsics[:, 2, 2] = 800, 450, 1
    camera2lidar = np.tile(np.eye(4), (count, 1, 1))
    for index in range(count):
        translation, _, rotation = random_pose(rng)
        camera2lidar[index, :3, :3], camera2lidar[index, :3, 3] = rotation, translation
    return intrinsics, camera2lidar


def test_quaternion_matches_rodrigues():
    rng = np.random.default_rng(0)
    for _ in range(50):
        translation, quaternion, rotation = random_pose(rng)
        np.testing.assert_allclose(pose_matrix(translation, quaternion)[:3, :3], rotation, atol=1e-12)
        np.testing.assert_allclose(pose_matrix(translation, -2.5 * quaternion)[:3, :3], rotation, atol=1e-12)


def test_from_camera2lidar_derives_consistent_matrices():
    rng = np.random.default_rng(1)
    intrinsics, camera2lidar = synthetic_rig(rng)
    calibration = Calibration.from_camera2lidar(intrinsics, camera2lidar, ImageConfig(), NAMES)
    point_lidar = np.array([4.0, -2.0, 0.5, 1.0])
    for index in range(6):
        rotation, translation = camera2lidar[index, :3, :3], camera2lidar[index, :3, 3]
        point_camera = rotation.T @ (point_lidar[:3] - translation)       # inverse rigid map
        pixel = intrinsics[index] @ point_camera
        np.testing.assert_allclose(calibration.lidar2image[index] @ point_lidar,
                                   [*pixel, 1.0], rtol=1e-12, atol=1e-9)
    expected_aug = np.array([[0.48, 0, 0, -32], [0, 0.48, 0, -176], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(calibration.img_aug_matrix, np.tile(expected_aug, (6, 1, 1)))


def test_from_nuscenes_static_and_with_ego_motion():
    rng = np.random.default_rng(2)
    intrinsics, _ = synthetic_rig(rng)
    cameras = [random_pose(rng) for _ in range(6)]
    lidar_translation, lidar_quaternion, lidar_rotation = random_pose(rng)
    calibration = Calibration.from_nuscenes(
        intrinsics, [(t, q) for t, q, _ in cameras], (lidar_translation, lidar_quaternion), ImageConfig())
    point = np.array([1.0, 2.0, 10.0])
    for index, (translation, _, rotation) in enumerate(cameras):
        in_ego = rotation @ point + translation
        in_lidar = lidar_rotation.T @ (in_ego - lidar_translation)
        np.testing.assert_allclose(calibration.camera2lidar[index] @ [*point, 1], [*in_lidar, 1],
                                   atol=1e-9)
    # Ego moved 1 m along x between the camera and the lidar timestamps: the camera-frame point
    # must come out 1 m further along the ego x axis, expressed in the lidar frame.
    lidar_pose = np.eye(4)
    camera_pose = np.eye(4)
    camera_pose[0, 3] = 1.0
    moving = Calibration.from_nuscenes(
        intrinsics, [(t, q) for t, q, _ in cameras], (lidar_translation, lidar_quaternion),
        ImageConfig(), camera_ego2global=[camera_pose] * 6, lidar_ego2global=lidar_pose)
    translation, _, rotation = cameras[0]
    shifted = lidar_rotation.T @ (rotation @ point + translation + [1, 0, 0] - lidar_translation)
    np.testing.assert_allclose(moving.camera2lidar[0] @ [*point, 1], [*shifted, 1], atol=1e-9)


def test_example_data_calibration(example_data_dir):
    calibration = Calibration.from_example_data(example_data_dir)
    assert calibration.camera_names == NAMES
    intrinsics = read_tensor(example_data_dir / "camera_intrinsics.tensor")[0].astype(np.float64)
    lidar2camera = read_tensor(example_data_dir / "lidar2camera.tensor")[0].astype(np.float64)
    lidar2image = read_tensor(example_data_dir / "lidar2image.tensor")[0].astype(np.float64)
    worst = 0.0
    for camera in range(6):                        # explicit float64 triple loop as reference
        for row in range(4):
            for column in range(4):
                product = sum(intrinsics[camera, row, k] * lidar2camera[camera, k, column]
                              for k in range(4))
                worst = max(worst, abs(product - lidar2image[camera, row, column]) / max(1, abs(product)))
    assert worst < 1e-4
    assert calibration.projection_error() == pytest.approx(worst, rel=1e-6)
    # Rebuilding from K + camera2lidar alone reproduces NVIDIA's derived matrices.
    rebuilt = Calibration.from_camera2lidar(intrinsics[:, :3, :3], calibration.camera2lidar,
                                            ImageConfig(), NAMES)
    np.testing.assert_allclose(rebuilt.lidar2image, lidar2image, rtol=1e-5, atol=2e-4)
    np.testing.assert_allclose(rebuilt.img_aug_matrix, calibration.img_aug_matrix, atol=1e-6)


def corrupt(calibration: Calibration, name: str, camera: int, edit) -> Calibration:
    matrices = {n: getattr(calibration, n).copy() for n in
                ("camera2lidar", "lidar2camera", "camera_intrinsics", "lidar2image", "img_aug_matrix")}
    edit(matrices[name][camera])
    return Calibration(camera_names=calibration.camera_names, **matrices)


@pytest.mark.parametrize("name, camera, edit, message", [
    ("camera2lidar", 3, lambda m: m.__setitem__((0, 1), np.nan), "camera 3 (BACK): camera2lidar contains NaN"),
    ("camera2lidar", 1, lambda m: m.__setitem__((slice(0, 3), slice(0, 3)), m[:3, :3] * 1.1),
     "camera 1 (FRONT_RIGHT): camera2lidar rotation is not a proper rotation"),
    ("camera2lidar", 2, lambda m: m.__setitem__((slice(0, 3), 0), -m[:3, 0]),
     "camera 2 (FRONT_LEFT): camera2lidar rotation is not a proper rotation"),
    ("lidar2camera", 4, lambda m: m.__setitem__((0, 3), m[0, 3] + 0.5),
     "camera 4 (BACK_LEFT): lidar2camera is not the inverse of camera2lidar"),
    ("lidar2image", 5, lambda m: m.__setitem__((0, 3), m[0, 3] * 1.01),
     "camera 5 (BACK_RIGHT): lidar2image differs from camera_intrinsics @ lidar2camera"),
    ("camera_intrinsics", 0, lambda m: m.__setitem__((0, 0), -m[0, 0]),
     "camera 0 (FRONT): camera_intrinsics focal lengths must be positive"),
    ("camera_intrinsics", 0, lambda m: m.__setitem__((2, 0), 0.3), "camera 0 (FRONT): camera_intrinsics must be"),
    ("img_aug_matrix", 2, lambda m: m.__setitem__((3, 0), 1.0), "camera 2 (FRONT_LEFT): img_aug_matrix bottom row"),
    ("img_aug_matrix", 2, lambda m: m.__setitem__((slice(0, 2), slice(0, 2)), 0.0),
     "camera 2 (FRONT_LEFT): img_aug_matrix must scale"),
])
def test_bad_calibration_names_the_camera(example_data_dir, name, camera, edit, message):
    good = Calibration.from_example_data(example_data_dir)
    with pytest.raises(CalibrationError) as error:
        corrupt(good, name, camera, edit).validate()
    assert message in str(error.value)


def test_camera_count_mismatch(example_data_dir, tmp_path):
    for path in example_data_dir.glob("*.tensor"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    with pytest.raises(CalibrationError, match=r"camera2lidar has shape \[6, 4, 4\], expected \[5, 4, 4\]"):
        Calibration.from_example_data(tmp_path, NAMES[:5])
    write_tensor(tmp_path / "lidar2image.tensor", read_tensor(tmp_path / "lidar2image.tensor")[:, :5])
    with pytest.raises(CalibrationError, match=r"lidar2image has shape \[5, 4, 4\], expected \[6, 4, 4\]"):
        Calibration.from_example_data(tmp_path)
    (tmp_path / "img_aug_matrix.tensor").unlink()
    with pytest.raises(CalibrationError, match="missing calibration file img_aug_matrix.tensor"):
        Calibration.from_example_data(tmp_path)


# ---------------------------------------------------------------- lens distortion

@pytest.mark.parametrize("model, coefficients", [
    ("plumb_bob", (-0.3, 0.1, 0.001, -0.002, 0.01)), ("plumb_bob", (-0.3, 0.1, 0.001, -0.002)),
    ("rational_polynomial", (0.2, -0.05, 0.001, 0.001, 0.01, 0.5, -0.02, 0.03)),
    ("equidistant", (0.05, -0.02, 0.01, -0.002)),
])
def test_supported_distortions_keep_their_coefficients(model, coefficients):
    distortion = distortion_from(model, list(coefficients))
    assert distortion == Distortion(model, coefficients)
    assert distortion.is_fisheye == (model == "equidistant")


@pytest.mark.parametrize("model, coefficients", [("plumb_bob", [0.0] * 5), ("rational_polynomial", [0.0] * 8),
                                                 ("", []), ("kannala_brandt", [0.0] * 4), ("unknown", [])])
def test_zero_or_no_coefficients_are_no_distortion_whatever_the_model(model, coefficients):
    assert distortion_from(model, coefficients) is None


@pytest.mark.parametrize("model, coefficients, message", [
    ("kannala_brandt", [0.1, 0, 0, 0], r"unsupported distortion model 'kannala_brandt' \(supported: plumb_bob, "
                                       r"rational_polynomial, equidistant\)"),
    ("plumb_bob", [0.1, 0, 0], "'plumb_bob' takes 4 or 5 coefficients, got 3"),
    ("rational_polynomial", [0.1] * 5, "'rational_polynomial' takes 8 coefficients, got 5"),
    ("equidistant", [0.1] * 5, "'equidistant' takes 4 coefficients, got 5"),
    ("plumb_bob", [0.1, float("nan"), 0, 0, 0], "must be finite"),
])
def test_bad_distortions_are_refused_with_the_reason(model, coefficients, message):
    with pytest.raises(DistortionError, match=message):
        distortion_from(model, coefficients)


def test_calibration_carries_one_distortion_per_camera():
    intrinsics, camera2lidar = synthetic_rig(np.random.default_rng(7))
    image = ImageConfig()
    lens = Distortion("plumb_bob", (-0.3, 0.1, 0.0, 0.0, 0.0))
    plain = Calibration.from_camera2lidar(intrinsics, camera2lidar, image, NAMES, [None] * 6)
    assert plain.distortions == () and not plain.distorted and plain.distortion(3) is None
    calibration = Calibration.from_camera2lidar(intrinsics, camera2lidar, image, NAMES, [None, lens] + [None] * 4)
    assert calibration.distorted and calibration.distortion(1) == lens and calibration.distortion(0) is None
    assert calibration.for_image(ImageConfig(resize_scale=0.16, output_width=256, output_height=128)).distortions \
        == calibration.distortions
    with pytest.raises(CalibrationError, match="distortions must be one Distortion or None per camera"):
        Calibration.from_camera2lidar(intrinsics, camera2lidar, image, NAMES, [lens, None])
    with pytest.raises(CalibrationError, match="distortions must be one Distortion or None per camera"):
        Calibration.from_camera2lidar(intrinsics, camera2lidar, image, NAMES, [None] * 5)
    with pytest.raises(CalibrationError, match="distortions must be one Distortion or None per camera"):
        Calibration.from_camera2lidar(intrinsics, camera2lidar, image, NAMES, [(-0.3, 0.1, 0, 0)] * 6)


def test_calibration_yaml_with_distortions(tmp_path):
    from bevfusion_ros.config import ConfigError
    from bevfusion_ros.io.calibration import calibration_from_yaml
    from bevfusion_ros.model.presets import TINY
    intrinsics, camera2lidar = synthetic_rig(np.random.default_rng(8))
    lens = {"model": "equidistant", "coefficients": [0.05, -0.02, 0.01, -0.002]}
    document = {"camera_intrinsics": intrinsics.tolist(), "camera2lidar": camera2lidar.tolist(),
                "distortions": [None, lens, None, None, None, None]}
    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump(document))
    loaded = calibration_from_yaml(path, TINY.pipeline)
    assert loaded.distortions == (None, Distortion("equidistant", (0.05, -0.02, 0.01, -0.002)), None, None, None, None)
    np.testing.assert_array_equal(loaded.camera_intrinsics[:, :3, :3], intrinsics)
    del document["distortions"]
    path.write_text(yaml.safe_dump(document))
    assert calibration_from_yaml(path, TINY.pipeline).distortions == ()
    document["distortions"] = [{"model": "fov", "coefficients": [0.9]}] + [None] * 5
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match=r"calibration file .*unsupported distortion model 'fov'"):
        calibration_from_yaml(path, TINY.pipeline)
