"""depth_map against a float32 scalar loop, the PyTorch reference and hand-made edge cases (spec 4)."""
from __future__ import annotations

import numpy as np
import pytest

from bevfusion_ros.camera.depth import depth_map
from bevfusion_ros.io.frame import load_example_data
from bevfusion_ros.model.presets import NUSCENES_R50

IMAGE = NUSCENES_R50.pipeline.image


def brute_force_depth(points, lidar2image, img_aug_matrix, height, width):
    """Scalar float32 loop in CUDA's order; a later point overwrites an earlier one.

    Returns the float32 depth images and, per pixel, how many distinct depths were written.
    """
    f32 = np.float32
    cameras = len(lidar2image)
    depth = np.zeros((cameras, height, width), np.float32)
    written: dict[tuple[int, int, int], set] = {}
    for camera in range(cameras):
        m, a = lidar2image[camera].astype(f32), img_aug_matrix[camera].astype(f32)
        for x, y, z in points[:, :3].astype(f32):
            h = [m[r, 0] * x + m[r, 1] * y + m[r, 2] * z + m[r, 3] for r in range(3)]
            dist = min(max(h[2], f32(1e-5)), f32(1e5))
            u, v = h[0] / dist, h[1] / dist
            column = a[0, 0] * u + a[0, 1] * v + a[0, 2] * dist + a[0, 3]
            row = a[1, 0] * u + a[1, 1] * v + a[1, 2] * dist + a[1, 3]
            if 0 <= column < width and 0 <= row < height:
                pixel = (camera, int(row), int(column))
                depth[pixel] = dist
                written.setdefault(pixel, set()).add(float(np.float16(dist)))
    return depth, written


@pytest.fixture(scope="module")
def frame(example_data_dir):
    return load_example_data(example_data_dir)


def test_matches_scalar_loop_and_last_point_wins(frame):
    rng = np.random.default_rng(0)
    points = frame.points[rng.choice(len(frame.points), 3000, replace=False)]
    farther = points[:600] * np.float32([1.003, 1.003, 1.003, 1, 1])     # ~same pixel, other depth
    points = np.concatenate([points, farther, points[600:700]])
    calibration = frame.calibration
    ours = depth_map(points, calibration.lidar2image, calibration.img_aug_matrix,
                     IMAGE.output_height, IMAGE.output_width)
    expected, written = brute_force_depth(points, calibration.lidar2image, calibration.img_aug_matrix,
                                          IMAGE.output_height, IMAGE.output_width)
    assert ours.shape == (6, 1, IMAGE.output_height, IMAGE.output_width) and ours.dtype == np.float16
    assert (expected > 0).sum() > 2000
    assert sum(len(depths) > 1 for depths in written.values()) > 100      # real collisions
    assert np.array_equal(ours[:, 0], expected.astype(np.float16))


def test_equals_the_reference_on_the_example_frame(frame):
    torch = pytest.importorskip("torch")
    from bevfusion_ros.model.reference import depth_images
    calibration = frame.calibration
    ours = depth_map(frame.points, calibration.lidar2image, calibration.img_aug_matrix,
                     IMAGE.output_height, IMAGE.output_width)
    expected = depth_images(torch.from_numpy(frame.points), calibration, NUSCENES_R50).numpy()
    assert np.array_equal(ours.view(np.uint16), expected.view(np.uint16))
    # Each camera receives 22.7k-35.3k points but only ~10-12k distinct pixels (spec 4).
    assert (ours > 0).sum(axis=(1, 2, 3)).tolist() == [9718, 10489, 10839, 12475, 11383, 12214]
    assert float(ours.max()) < 80 and float(ours[ours > 0].min()) > 0.5


def test_fp16_points_and_extra_columns_give_the_same_map(frame):
    calibration = frame.calibration
    arguments = (calibration.lidar2image, calibration.img_aug_matrix, IMAGE.output_height, IMAGE.output_width)
    full = depth_map(frame.points, *arguments)
    assert np.array_equal(depth_map(frame.points.astype(np.float16), *arguments), full)
    assert np.array_equal(depth_map(frame.points[:, :3], *arguments), full)


def test_pixel_bounds_clamp_and_augmentation():
    # Camera looking along lidar +z with f = 10 and no principal point; image 4 x 3 pixels.
    lidar2image = np.array([[[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]])
    identity = np.eye(4)[None]
    points = np.array([
        [0.0, 0.0, 2.0],     # column 0, row 0: inside (lower bound inclusive)
        [0.8, 0.0, 2.0],     # column 4.0 == width: outside (upper bound exclusive)
        [0.79, 0.5, 2.0],    # column 3.95, row 2.5 -> pixel (2, 3)
        [0.1, 0.1, -2.0],    # behind: dist clamps to 1e-5, (u, v) = (1e5, 1e5): outside
    ], dtype=np.float32)
    depth = depth_map(points, lidar2image, identity, 3, 4)[0, 0]
    assert depth[0, 0] == 2.0 and depth[2, 3] == 2.0 and np.count_nonzero(depth) == 2
    # A point behind the camera on the optical axis stays at (0, 0) and writes the clamped 1e-5.
    on_axis = depth_map(np.array([[0.0, 0.0, -3.0]], np.float32), lidar2image, identity, 3, 4)[0, 0]
    assert on_axis[0, 0] == np.float16(1e-5)
    # img_aug_matrix: scale by 0.5 and shift by -1 pixel, as a resize + crop would.
    augmentation = np.array([[[0.5, 0, 0, -1], [0, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]])
    moved = depth_map(points[2:3], lidar2image, augmentation, 3, 4)[0, 0]
    assert moved[1, 0] == 2.0 and np.count_nonzero(moved) == 1          # column 0.975, row 1.25


MATRICES = r"lidar2image and img_aug_matrix must both be \[N, 4, 4\]"


@pytest.mark.parametrize("points, lidar2image, message", [
    (np.zeros((5, 2), np.float32), np.zeros((6, 4, 4)), r"points must be \[P, >=3\]"),
    (np.zeros(5, np.float32), np.zeros((6, 4, 4)), r"points must be \[P, >=3\]"),
    (np.zeros((5, 3), np.float32), np.zeros((5, 4, 4)), MATRICES),
    (np.zeros((5, 3), np.float32), np.zeros((6, 3, 4)), MATRICES),
], ids=["columns", "ndim", "camera count", "matrix shape"])
def test_rejects_malformed_inputs(points, lidar2image, message):
    with pytest.raises(ValueError, match=message):
        depth_map(points, lidar2image, np.zeros((6, 4, 4)), 256, 704)
