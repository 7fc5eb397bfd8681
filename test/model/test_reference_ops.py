"""BEVFusionReference's stages against brute-force loops and OpenCV."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bevfusion_ros.io.frame import load_example_data  # noqa: E402
from bevfusion_ros.model.presets import NUSCENES_R50, TINY  # noqa: E402
from bevfusion_ros.model.reference import (  # noqa: E402
    bev_pool,
    decode_boxes,
    depth_images,
    frustum_bev_cells,
    normalize_images,
    voxelize,
)


def test_normalize_matches_opencv_resize_and_crop():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (900, 1600, 3), dtype=np.uint8) for _ in range(2)]
    for preset in (NUSCENES_R50, TINY):
        image = preset.pipeline.image
        ours = normalize_images(images, preset).float().numpy()
        crop_x, crop_y = image.crop
        for index, rgb in enumerate(images):
            pixels = ours[index].transpose(1, 2, 0) * np.array(image.std) * 255 + np.array(image.mean) * 255
            assert np.abs(pixels - np.rint(pixels)).max() < 0.06        # fp16 of an integer level
            resized = cv2.resize(rgb, image.resized_size, interpolation=cv2.INTER_LINEAR)
            cropped = resized[crop_y:crop_y + image.output_height, crop_x:crop_x + image.output_width]
            difference = np.abs(np.rint(pixels) - cropped)
            # OpenCV steps by the double 1600/768, CUDA by the float32 quotient 1.0f/0.48f: on
            # white noise 2 % of pixels land one grey level apart (1 % on the real images).
            assert difference.max() <= 1 and (difference > 0).mean() < 0.03


def brute_force_depth(points, calibration, height, width):
    depth = np.zeros((calibration.num_cameras, height, width))
    for camera in range(calibration.num_cameras):
        for point in points:                          # later points overwrite earlier ones
            h = calibration.lidar2image[camera] @ [point[0], point[1], point[2], 1.0]
            dist = min(max(h[2], 1e-5), 1e5)
            u, v = h[0] / dist, h[1] / dist
            a = calibration.img_aug_matrix[camera]
            column = a[0, 0] * u + a[0, 1] * v + a[0, 2] * dist + a[0, 3]
            row = a[1, 0] * u + a[1, 1] * v + a[1, 2] * dist + a[1, 3]
            if 0 <= column < width and 0 <= row < height:
                depth[camera, int(row), int(column)] = dist
    return depth


def test_depth_map_matches_brute_force(example_data_dir):
    frame = load_example_data(example_data_dir)
    rng = np.random.default_rng(1)
    points = frame.points[rng.choice(len(frame.points), 3000, replace=False)]
    points = np.concatenate([points, points[:200]])            # duplicates: last writer wins
    image = NUSCENES_R50.pipeline.image
    ours = depth_images(torch.from_numpy(points), frame.calibration, NUSCENES_R50)[:, 0].float().numpy()
    expected = brute_force_depth(points.astype(np.float64), frame.calibration,
                                 image.output_height, image.output_width)
    assert (expected > 0).sum() > 1000
    assert np.array_equal(ours > 0, expected > 0)
    np.testing.assert_allclose(ours, expected, rtol=1e-3)      # fp16 storage


def test_frustum_cells_and_bev_pool_against_loops(ring_calibration):
    rng = np.random.default_rng(2)
    calibration = ring_calibration(TINY.pipeline)
    intrinsics, camera2lidar = calibration.camera_intrinsics[:, :3, :3], calibration.camera2lidar
    point_ids, cells = frustum_bev_cells(calibration, TINY)
    geometry = TINY.pipeline.camera_geometry
    depth_bins, fh, fw = geometry.depth_bins, geometry.feature_height, geometry.feature_width
    nx, ny, _ = geometry.bev_size
    # CUDA-BEVFusion's grid constants: bx = min + step/2 and dx = step held in float32.
    bounds = (geometry.xbound, geometry.ybound, geometry.zbound)
    step = [float(np.float32(b[2])) for b in bounds]
    lower = [float(np.float32(b[0] + b[2] / 2)) - s / 2 for b, s in zip(bounds, step)]
    expected = {}
    image = TINY.pipeline.image
    for camera in range(6):
        for k in range(depth_bins):
            for i in range(fh):
                for j in range(fw):
                    u = j * (image.output_width - 1) / (fw - 1)
                    v = i * (image.output_height - 1) / (fh - 1)
                    d = geometry.dbound[0] + geometry.dbound[2] * k
                    aug = calibration.img_aug_matrix[camera]
                    original = np.linalg.solve(aug[:3, :3], np.array([u, v, d]) - aug[:3, 3])
                    lifted = np.array([original[0] * original[2], original[1] * original[2], original[2]])
                    lidar = camera2lidar[camera, :3, :3] @ np.linalg.solve(intrinsics[camera], lifted) \
                        + camera2lidar[camera, :3, 3]
                    cell = [int((lidar[a] - lower[a]) / step[a]) for a in range(3)]
                    if 0 <= cell[0] < nx and 0 <= cell[1] < ny and cell[2] == 0:
                        n = ((camera * depth_bins + k) * fh + i) * fw + j
                        expected[n] = cell[0] * ny + cell[1]
    ours = dict(zip(point_ids.tolist(), cells.tolist()))
    mismatched = set(ours.items()) ^ set(expected.items())
    assert len(expected) > 10000 and len(mismatched) == 0
    features = torch.from_numpy(rng.standard_normal((6, fh, fw, geometry.camera_channels)))
    weights = torch.from_numpy(rng.random((6, depth_bins, fh, fw)))
    pooled = bev_pool(features, weights, point_ids, cells, (nx, ny))[0].numpy()
    reference = np.zeros((geometry.camera_channels, nx, ny))
    flat_weights = weights.numpy().reshape(-1)
    for n, cell in ours.items():
        camera, pixel = n // (depth_bins * fh * fw), n % (fh * fw)
        pixel_features = features.numpy()[camera].reshape(-1, geometry.camera_channels)[pixel]
        reference[:, cell // ny, cell % ny] += flat_weights[n] * pixel_features
    np.testing.assert_allclose(pooled, reference, rtol=1e-10, atol=1e-10)


def brute_force_voxels(points, preset):
    voxel = preset.pipeline.voxelization
    low = np.float32(voxel.point_range_min)
    high = np.float32(voxel.point_range_max)
    size = np.float32(voxel.voxel_size)
    grid = voxel.grid_size
    members: dict[tuple, list] = {}
    for point in points.astype(np.float32):
        if not ((point[:3] >= low) & (point[:3] < high)).all():
            continue
        index = tuple(int(np.floor(np.float32(point[a] - low[a]) / size[a])) for a in range(3))
        if not all(0 <= index[a] < grid[a] for a in range(3)):
            continue
        if index not in members and len(members) >= voxel.max_voxels:
            continue
        members.setdefault(index, [])
        if len(members[index]) < voxel.max_points_per_voxel:
            members[index].append(point.astype(np.float64))
    return {index: np.mean(rows, axis=0) for index, rows in members.items()}


def test_voxelize_matches_brute_force():
    rng = np.random.default_rng(3)
    count = 6000
    points = np.concatenate([
        rng.uniform([-56, -56, -6, 0, 0], [56, 56, 4, 255, 0.5], (count, 5)),
        np.repeat(rng.uniform([-5, -5, -1, 0, 0], [5, 5, 1, 255, 0.5], (40, 5)), 15, axis=0)
        + rng.normal(0, 0.01, (600, 5)),                        # dense voxels: > 10 points each
    ]).astype(np.float16).astype(np.float32)
    points[[5, 17], 0] = 54.0                                   # exactly on the exclusive bound
    features, coords = voxelize(torch.from_numpy(points), TINY)
    expected = brute_force_voxels(points, TINY)
    ours = {tuple(c[1:]): f for c, f in zip(coords.tolist(), features.float().numpy())}
    assert set(ours) == set(expected) and (coords[:, 0] == 0).all()
    for index, mean in expected.items():
        np.testing.assert_allclose(ours[index], mean, rtol=2e-3, atol=1e-3)    # fp16 storage


def test_decode_matches_loop(loop_decode):
    rng = np.random.default_rng(4)
    preset = NUSCENES_R50
    k = preset.pipeline.head.num_proposals
    outputs = dict(score=rng.random((1, 10, k)), rot=rng.normal(size=(1, 2, k)),
                   dim=rng.normal(0, 0.5, (1, 3, k)), reg=rng.uniform(-20, 200, (1, 2, k)),
                   height=rng.normal(0, 5, (1, 1, k)), vel=rng.normal(size=(1, 2, k)))
    boxes = decode_boxes(**{key: torch.from_numpy(value) for key, value in outputs.items()},
                         preset=preset).numpy()
    expected = loop_decode(outputs)
    assert 20 < len(expected) < k
    np.testing.assert_allclose(boxes, expected, rtol=1e-12, atol=1e-12)
