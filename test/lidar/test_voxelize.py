"""NumPy voxelizer: brute-force loop, the PyTorch reference (bit-exact) and the example frame."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bevfusion_ros.io.tensor import read_tensor
from bevfusion_ros.lidar.voxelize import voxelize
from bevfusion_ros.model.presets import NUSCENES_R50, TINY

R50 = NUSCENES_R50.pipeline.voxelization
SMALL = TINY.pipeline.voxelization


def brute_force_voxels(points: np.ndarray, config) -> tuple[dict[tuple, list[np.ndarray]], list[int]]:
    """Point by point, float32 index arithmetic. Returns (voxel (ix, iy, iz) -> its first
    max_points_per_voxel points, for the first max_voxels voxels in order of first appearance;
    number of points in each occupied voxel, all voxels, same order)."""
    low, high, size = (np.float32(v) for v in (config.point_range_min, config.point_range_max,
                                               config.voxel_size))
    points_in: dict[tuple, list[np.ndarray]] = {}
    for point in points.astype(np.float32):
        if not (np.isfinite(point).all() and (point[:3] >= low).all() and (point[:3] < high).all()):
            continue
        index = tuple(int(np.floor(np.float32(point[a] - low[a]) / size[a])) for a in range(3))
        if all(0 <= index[a] < config.grid_size[a] for a in range(3)):
            points_in.setdefault(index, []).append(point.astype(np.float64))
    kept = list(points_in)[:config.max_voxels]
    return ({index: points_in[index][:config.max_points_per_voxel] for index in kept},
            [len(rows) for rows in points_in.values()])


def random_points(seed: int) -> np.ndarray:
    """Uniform points over and beyond the range, 40 dense clusters of 15 points (> 10 per voxel),
    points exactly on the max/min bounds and rows with NaN / inf; fp16 values like the lidar input."""
    rng = np.random.default_rng(seed)
    points = np.concatenate([
        rng.uniform([-56, -56, -6, 0, 0], [56, 56, 4, 255, 0.5], (4000, 5)),
        np.repeat(rng.uniform([-5, -5, -1, 0, 0], [5, 5, 1, 255, 0.5], (40, 5)), 15, axis=0)
        + rng.normal(0, 0.005, (600, 5)),
    ]).astype(np.float16).astype(np.float32)
    rng.shuffle(points)
    points[[5, 17], 0] = 54.0          # on the exclusive max: dropped
    points[23, 1] = 54.0
    points[31, 2] = 3.0
    points[41, :3] = (-54.0, -54.0, -5.0)  # on the inclusive min: kept in voxel (0, 0, 0)
    points[[50, 51], 0] = np.nan
    points[52, 1] = np.inf
    points[53, 2] = -np.inf
    points[54, :4] = (1.0, 2.0, 0.5, np.nan)   # in range, but a NaN intensity would poison the mean
    return points


@pytest.mark.parametrize("max_voxels", [SMALL.max_voxels, 300])
def test_matches_brute_force(max_voxels):
    config = replace(SMALL, max_voxels=max_voxels)
    points = random_points(seed=1)
    voxels = voxelize(points, config)
    expected, sizes = brute_force_voxels(points, config)

    assert (0, 0, 0) in expected and len(sizes) > 300    # the min corner; max_voxels=300 drops voxels
    assert [tuple(c) for c in voxels.coords[:, 1:].tolist()] == list(expected)   # first-appearance order
    assert voxels.coords.dtype == np.int32 and (voxels.coords[:, 0] == 0).all()
    assert voxels.features.dtype == np.float16 and voxels.features.shape == (len(expected), 5)
    np.testing.assert_array_equal(voxels.point_count, [len(rows) for rows in expected.values()])
    means = np.array([np.mean(rows, axis=0) for rows in expected.values()])
    np.testing.assert_allclose(voxels.features.astype(np.float64), means, rtol=1e-3, atol=1e-4)
    assert voxels.point_count.max() == config.max_points_per_voxel   # the dense clusters are capped

    capacity, kept_sizes = config.max_points_per_voxel, sizes[:max_voxels]
    assert voxels.points_over_capacity == sum(max(0, n - capacity) for n in kept_sizes)
    assert voxels.voxels_over_capacity == len(sizes) - len(kept_sizes)
    assert voxels.points_in_dropped_voxels == sum(sizes[max_voxels:])
    assert voxels.points_out_of_range == len(points) - sum(sizes)


def test_nan_and_inf_rows_are_dropped():
    points = random_points(seed=3)
    bad_rows = [50, 51, 52, 53, 54]
    clean = np.delete(points, bad_rows, axis=0)
    with_bad, without = voxelize(points, SMALL), voxelize(clean, SMALL)
    np.testing.assert_array_equal(with_bad.coords, without.coords)
    np.testing.assert_array_equal(with_bad.features, without.features)
    assert with_bad.points_out_of_range == without.points_out_of_range + len(bad_rows)
    assert np.isfinite(with_bad.features.astype(np.float32)).all()


def test_empty_input():
    voxels = voxelize(np.zeros((0, 5), np.float32), SMALL)
    assert voxels.num_voxels == 0 and voxels.features.shape == (0, 5) and voxels.coords.shape == (0, 4)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        voxelize(np.zeros((10, 2), np.float32), SMALL)


@pytest.fixture(scope="module")
def example_points(example_data_dir) -> np.ndarray:
    """The example frame's points, fp16 [242180, 5] as stored."""
    return read_tensor(example_data_dir / "points.tensor")


def reference_voxelize(points: np.ndarray, preset):
    torch = pytest.importorskip("torch")
    from bevfusion_ros.model.reference import voxelize as torch_voxelize
    features, coords = torch_voxelize(torch.from_numpy(points.astype(np.float32)), preset)
    return features.numpy(), coords.numpy()


def assert_bit_exact(voxels, features: np.ndarray, coords: np.ndarray) -> None:
    np.testing.assert_array_equal(voxels.coords, coords)
    np.testing.assert_array_equal(voxels.features.view(np.uint16), features.view(np.uint16))


def test_equals_torch_reference_on_random_points():
    points = random_points(seed=4)
    points = points[np.isfinite(points).all(axis=1)]       # the reference assumes finite input
    assert_bit_exact(voxelize(points, SMALL), *reference_voxelize(points, TINY))


def test_equals_torch_reference_on_float32_clusters():
    """Full float32 coordinates (no fp16 rounding) make the summation order visible in the fp16 mean:
    points must be added in input order like the reference's index_add."""
    rng = np.random.default_rng(5)
    centres = rng.uniform([-50, -50, -4, 0, 0], [50, 50, 2, 255, 0.5], (12000, 5))
    points = (np.repeat(centres, 12, axis=0) + rng.normal(0, 0.05, (144000, 5))).astype(np.float32)
    assert_bit_exact(voxelize(points, SMALL), *reference_voxelize(points, TINY))


@pytest.mark.parametrize("preset", [NUSCENES_R50, TINY], ids=lambda p: p.name)
def test_equals_torch_reference_on_example_frame(example_points, preset):
    voxels = voxelize(example_points, preset.pipeline.voxelization)   # fp16 input is widened
    assert_bit_exact(voxels, *reference_voxelize(example_points, preset))


def float64_voxel_count(points: np.ndarray, config) -> int:
    """Occupied voxels with the index computed in float64 (the wrong arithmetic for CUDA-BEVFusion)."""
    xyz = points[:, :3].astype(np.float64)
    low, high = np.array(config.point_range_min), np.array(config.point_range_max)
    xyz = xyz[((xyz >= low) & (xyz < high)).all(axis=1)]
    index = np.floor((xyz - low) / np.array(config.voxel_size)).astype(np.int64)
    return len(np.unique(index, axis=0))


def test_example_frame_counts(example_points):
    voxels = voxelize(example_points, R50)
    assert voxels.num_voxels == 44224                         # spec "Read first"
    assert float64_voxel_count(example_points, R50) == 44212  # float32 division matters
    assert voxels.points_out_of_range == 13                   # spec 1.4: on the 54 m / 3 m bounds
    assert voxels.voxels_over_capacity == voxels.points_in_dropped_voxels == 0
    assert voxels.point_count.sum() + voxels.points_over_capacity == len(example_points) - 13
    assert voxels.coords[:, 1:].min() >= 0 and (voxels.coords[:, 1:].max(axis=0) < R50.grid_size).all()
