"""compute_geometry and bev_pool against scalar loops, the PyTorch reference and the spec's counts."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bevfusion_ros.camera.bevpool import bev_pool
from bevfusion_ros.camera.geometry import CameraGeometry, compute_geometry
from bevfusion_ros.config import CameraGeometryConfig, PipelineConfig
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.frame import load_example_data
from bevfusion_ros.model.presets import NUSCENES_R50, TINY


@pytest.fixture(scope="module")
def frame(example_data_dir):
    return load_example_data(example_data_dir)


@pytest.fixture(scope="module")
def r50_geometry(frame):
    return compute_geometry(frame.calibration, NUSCENES_R50.pipeline)


def with_augmentations(calibration: Calibration, matrices: np.ndarray) -> Calibration:
    return dataclasses.replace(calibration, img_aug_matrix=matrices)


def interval_lengths(geometry: CameraGeometry) -> np.ndarray:
    return geometry.intervals[:, 1] - geometry.intervals[:, 0]


def sorted_point_cells(geometry: CameraGeometry) -> np.ndarray:
    """BEV cell of each sorted point covered by an interval."""
    return np.repeat(geometry.intervals[:, 2], interval_lengths(geometry))


def loop_cell(point_id: int, calibration: Calibration, pipeline: PipelineConfig) -> int | None:
    """Flat BEV cell of one frustum point by the spec's formulas in float64 (None when dropped)."""
    geometry, image = pipeline.camera_geometry, pipeline.image
    depth_bins, fh, fw = geometry.depth_bins, geometry.feature_height, geometry.feature_width
    camera, rest = divmod(point_id, depth_bins * fh * fw)
    k, rest = divmod(rest, fh * fw)
    i, j = divmod(rest, fw)
    u = j * (image.output_width - 1) / (fw - 1)
    v = i * (image.output_height - 1) / (fh - 1)
    d = geometry.dbound[0] + geometry.dbound[2] * k
    augmentation = calibration.img_aug_matrix[camera]
    u0, v0, d0 = np.linalg.solve(augmentation[:3, :3], np.array([u, v, d]) - augmentation[:3, 3])
    in_camera = np.linalg.solve(calibration.camera_intrinsics[camera, :3, :3], [u0 * d0, v0 * d0, d0])
    lidar = calibration.camera2lidar[camera, :3, :3] @ in_camera + calibration.camera2lidar[camera, :3, 3]
    bounds = (geometry.xbound, geometry.ybound, geometry.zbound)
    cell = []
    for axis, (low, _, step) in enumerate(bounds):      # CUDA: float32 bx = low + step/2 and dx = step
        dx = float(np.float32(step))
        cell.append(int((lidar[axis] - (float(np.float32(low + step / 2)) - dx / 2)) / dx))
    nx, ny, nz = geometry.bev_size
    if 0 <= cell[0] < nx and 0 <= cell[1] < ny and 0 <= cell[2] < nz:
        return cell[0] * ny + cell[1]
    return None


def test_example_counts_and_interval_layout(r50_geometry):
    geometry = r50_geometry
    assert geometry.bev_size == (360, 360) and geometry.frustum_shape == (6, 118, 32, 88)
    assert abs(geometry.keep_count - 1_833_766) <= 2            # spec "Read first"
    assert abs(len(geometry.intervals) - 96_801) <= 2
    assert abs(interval_lengths(geometry).max() - 887) <= 2     # spec 3.3: most points in one cell
    starts, ends, offsets = geometry.intervals.T
    assert geometry.intervals.dtype == np.int32 and starts[0] == 0 and ends[-1] == geometry.keep_count
    assert np.array_equal(starts[1:], ends[:-1]) and (ends > starts).all()
    assert (np.diff(offsets) > 0).all() and offsets.min() >= 0 and offsets.max() < 360 * 360
    indices = geometry.indices
    assert len(indices) == geometry.keep_count and (np.bincount(indices) <= 1).all()
    assert indices.min() >= 0 and indices.max() < 6 * 118 * 32 * 88
    cells = sorted_point_cells(geometry)
    same_cell = cells[1:] == cells[:-1]
    assert (np.diff(indices)[same_cell] > 0).all()              # stable sort: ids ascending in a cell


def test_cells_equal_the_reference(frame, r50_geometry):
    pytest.importorskip("torch")
    from bevfusion_ros.model.reference import frustum_bev_cells
    tiny_geometry = compute_geometry(frame.calibration, TINY.pipeline)
    for preset, geometry in ((NUSCENES_R50, r50_geometry), (TINY, tiny_geometry)):
        point_ids, cells = (tensor.numpy() for tensor in frustum_bev_cells(frame.calibration, preset))
        order = np.argsort(cells, kind="stable")
        assert np.array_equal(geometry.indices, point_ids[order]), preset.name
        assert np.array_equal(sorted_point_cells(geometry), cells[order]), preset.name


def test_cells_match_a_scalar_loop_on_sampled_points(frame, r50_geometry):
    cell_of = np.full(int(np.prod(r50_geometry.frustum_shape)), -1)
    cell_of[r50_geometry.indices] = sorted_point_cells(r50_geometry)
    sample = np.random.default_rng(0).choice(len(cell_of), 2000, replace=False)
    expected = [loop_cell(int(n), frame.calibration, NUSCENES_R50.pipeline) for n in sample]
    assert 1000 < sum(cell is not None for cell in expected) < 2000
    assert [None if cell < 0 else cell for cell in cell_of[sample].tolist()] == expected


def test_cuda_last_interval_drops_the_last_sorted_point(frame, r50_geometry):
    cuda = compute_geometry(frame.calibration, NUSCENES_R50.pipeline, last_interval="cuda")
    assert np.array_equal(cuda.indices, r50_geometry.indices) and cuda.keep_count == r50_geometry.keep_count
    assert np.array_equal(cuda.intervals[:-1], r50_geometry.intervals[:-1])
    assert cuda.intervals[-1, 1] == r50_geometry.intervals[-1, 1] - 1 == r50_geometry.keep_count - 1
    with pytest.raises(ValueError, match="last_interval must be 'exclusive' or 'cuda'"):
        compute_geometry(frame.calibration, TINY.pipeline, last_interval="inclusive")


def test_camera0_augmentation(frame, ring_calibration):
    tiny = TINY.pipeline
    shared = compute_geometry(frame.calibration, tiny, camera0_augmentation=True)
    own = compute_geometry(frame.calibration, tiny)
    assert np.array_equal(shared.indices, own.indices) and np.array_equal(shared.intervals, own.intervals)
    calibration = ring_calibration(tiny)
    augmentations = calibration.img_aug_matrix.copy()
    augmentations[:, 0, 0] = augmentations[:, 1, 1] = np.linspace(0.14, 0.18, 6)    # per-camera resize
    augmentations[:, 0, 3] = np.linspace(-10, 10, 6)
    varied = with_augmentations(calibration, augmentations)
    per_camera = compute_geometry(varied, tiny)
    camera0 = compute_geometry(varied, tiny, camera0_augmentation=True)
    assert not np.array_equal(per_camera.indices, camera0.indices)
    all_camera0 = with_augmentations(calibration, np.repeat(augmentations[:1], 6, axis=0))
    expected = compute_geometry(all_camera0, tiny)
    assert np.array_equal(camera0.indices, expected.indices)
    assert np.array_equal(camera0.intervals, expected.intervals)


def test_rejects_a_grid_with_several_z_cells(frame):
    pipeline = dataclasses.replace(TINY.pipeline, camera_geometry=dataclasses.replace(
        TINY.pipeline.camera_geometry, zbound=(-10.0, 10.0, 10.0)))
    with pytest.raises(ValueError, match="2 z cells"):
        compute_geometry(frame.calibration, pipeline)


def brute_force_pool(features, weights, geometry):
    """float64 loop over the sorted points of every interval."""
    cameras, depth_bins, height, width = geometry.frustum_shape
    bev = np.zeros((features.shape[3], *geometry.bev_size))
    flat_weights = weights.reshape(-1).astype(np.float64)
    for start, end, offset in geometry.intervals:
        for n in geometry.indices[start:end]:
            camera, pixel = n // (depth_bins * height * width), n % (height * width)
            feature = features[camera].reshape(height * width, -1)[pixel].astype(np.float64)
            bev[:, offset // geometry.bev_size[1], offset % geometry.bev_size[1]] += flat_weights[n] * feature
    return bev[None]


SMALL = dataclasses.replace(TINY.pipeline, camera_geometry=CameraGeometryConfig(
    xbound=(-30.0, 30.0, 2.0), ybound=(-30.0, 30.0, 2.0), dbound=(1.0, 41.0, 4.0),
    feature_width=16, feature_height=8, camera_channels=10))


@pytest.mark.parametrize("last_interval", ["exclusive", "cuda"])
def test_bev_pool_matches_a_loop(last_interval, ring_calibration):
    geometry = compute_geometry(ring_calibration(SMALL), SMALL, last_interval=last_interval)
    assert 2000 < geometry.keep_count < 6 * 10 * 8 * 16 and len(geometry.intervals) > 200
    rng = np.random.default_rng(1)
    features = rng.standard_normal((6, 8, 16, 10)).astype(np.float32)
    weights = rng.random((6, 10, 8, 16)).astype(np.float32)
    pooled = bev_pool(features, weights, geometry)
    assert pooled.shape == (1, 10, 30, 30) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, brute_force_pool(features, weights, geometry), rtol=1e-5, atol=1e-5)
    empty = np.ones((30 * 30,), bool)
    empty[geometry.intervals[:, 2]] = False
    assert empty.any() and (pooled[0].reshape(10, -1)[:, empty] == 0).all()


def test_bev_pool_cuda_interval_excludes_the_last_point(ring_calibration):
    calibration = ring_calibration(SMALL)
    exclusive = compute_geometry(calibration, SMALL)
    cuda = compute_geometry(calibration, SMALL, last_interval="cuda")
    features = np.ones((6, 8, 16, 10), np.float32)
    weights = np.ones((6, 10, 8, 16), np.float32)
    difference = bev_pool(features, weights, exclusive) - bev_pool(features, weights, cuda)
    x, y = divmod(int(exclusive.intervals[-1, 2]), 30)
    assert (difference[0, :, x, y] == 1).all() and np.count_nonzero(difference) == 10


def test_bev_pool_on_a_hand_made_geometry():
    # 2 cameras, D = 2, fH = 1, fW = 2: point n is camera n // 4, depth bin n // 2 % 2, pixel n % 2.
    geometry = CameraGeometry(indices=np.array([1, 6, 7, 2]), intervals=np.array([[0, 3, 5], [3, 3, 11]]),
                              keep_count=4, bev_size=(3, 4), frustum_shape=(2, 2, 1, 2))
    features = np.arange(1, 13, dtype=np.float32).reshape(2, 1, 2, 3)      # [N, fH, fW, C = 3]
    weights = np.array([1, 2, 3, 4, 5, 6, 7, 8], np.float32).reshape(2, 2, 1, 2)
    pooled = bev_pool(features, weights, geometry)
    expected = np.zeros((1, 3, 3, 4), np.float32)
    expected[0, :, 1, 1] = 2 * features[0, 0, 1] + 7 * features[1, 0, 0] + 8 * features[1, 0, 1]
    assert np.array_equal(pooled, expected)        # the empty last interval (cell 11) stays 0


def test_bev_pool_equals_the_reference_on_the_example_frame(frame):
    torch = pytest.importorskip("torch")
    from bevfusion_ros.model.reference import bev_pool as reference_pool
    from bevfusion_ros.model.reference import frustum_bev_cells
    geometry = compute_geometry(frame.calibration, TINY.pipeline)
    cameras, depth_bins, height, width = geometry.frustum_shape
    rng = np.random.default_rng(2)
    channels = TINY.pipeline.camera_geometry.camera_channels
    features = rng.random((cameras, height, width, channels)).astype(np.float16)
    weights = rng.random((cameras, depth_bins, height, width)).astype(np.float16)
    point_ids, cells = frustum_bev_cells(frame.calibration, TINY)
    expected = reference_pool(torch.from_numpy(features).double(), torch.from_numpy(weights).double(),
                              point_ids, cells, geometry.bev_size).numpy()
    pooled = bev_pool(features, weights, geometry)
    assert (expected > 0).sum() > 1000
    np.testing.assert_allclose(pooled, expected, rtol=1e-5)
    widened = bev_pool(features.astype(np.float32), weights.astype(np.float32), geometry)
    assert np.array_equal(widened, pooled)


@pytest.mark.parametrize("feature_shape, weight_shape, message", [
    ((6, 8, 16, 10), (6, 10, 8, 15), r"depth_weights must be \[N, D, fH, fW\] = \[6, 10, 8, 16\]"),
    ((6, 10, 8, 16), (6, 10, 8, 16), r"camera_feature must be NHWC \[6, 8, 16, C\]"),
    ((5, 8, 16, 10), (6, 10, 8, 16), r"camera_feature must be NHWC"),
], ids=["weights", "NCHW features", "camera count"])
def test_bev_pool_rejects_wrong_shapes(feature_shape, weight_shape, message, ring_calibration):
    geometry = compute_geometry(ring_calibration(SMALL), SMALL)
    with pytest.raises(ValueError, match=message):
        bev_pool(np.zeros(feature_shape, np.float32), np.zeros(weight_shape, np.float32), geometry)
