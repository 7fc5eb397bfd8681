"""SweepAccumulator: BEVFusion's multi-sweep lidar input, checked on synthetic scenes.

The reference for motion compensation is geometric and independent of the implementation:
static world points are seen from a moving lidar; wherever they were seen from, the
accumulated output must put them where the current lidar sees them.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from bevfusion_ros.streaming.sweeps import SweepAccumulator

S = 1_000_000_000
PERIOD = 50_000_000                  # 20 Hz
T0 = 1_700_000_000 * S               # a realistic epoch stamp: lags must not lose precision


def pose(k: float) -> np.ndarray:
    """world_T_lidar of a lidar driving a curve, slightly pitched and rolled."""
    yaw, pitch, roll = 0.3 + 0.04 * k, 0.01 * math.sin(k), 0.02 * math.cos(k)
    cz, sz, cy, sy, cx, sx = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
                              math.cos(roll), math.sin(roll))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx
    m[:3, 3] = (100.0 + 0.6 * k, -20.0 + 0.25 * k, 1.8)
    return m


def observe(world_xyz: np.ndarray, world_T_lidar: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[N, 4] float32 (x, y, z, intensity=id) of world points in the lidar frame."""
    homogeneous = np.hstack([world_xyz, np.ones((len(world_xyz), 1))])
    local = (np.linalg.inv(world_T_lidar) @ homogeneous.T).T[:, :3]
    return np.hstack([local, ids[:, None]]).astype(np.float32)


@pytest.fixture
def scene():
    rng = np.random.default_rng(7)
    angle = rng.uniform(0, 2 * math.pi, 3000)
    radius = rng.uniform(6.0, 50.0, 3000)
    world = np.stack([100.0 + radius * np.cos(angle), -20.0 + radius * np.sin(angle),
                      rng.uniform(-0.5, 3.0, 3000)], axis=1)
    # No point comes within 3 m (horizontally) of the lidar along its path: none is "close".
    path = np.stack([pose(k)[:2, 3] for k in range(16)])
    far = np.linalg.norm(world[:, None, :2] - path[None], axis=2).min(axis=1) > 3.0
    world = world[far]
    return world, np.arange(len(world), dtype=np.float64)


def blocks(output: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """Contiguous runs of equal time lag, in output order."""
    lag = output[:, 4]
    starts = np.flatnonzero(np.r_[True, lag[1:] != lag[:-1]])
    ends = np.r_[starts[1:], len(lag)]
    return [(float(lag[a]), output[a:b]) for a, b in zip(starts, ends)]


def test_motion_compensation_time_lags_and_order(scene):
    world, ids = scene
    acc = SweepAccumulator()                                  # 10 sweeps, BEVFusion nuScenes
    for k in range(14):
        out = acc.add(observe(world, pose(k), ids), T0 + k * PERIOD, pose(k))
        assert acc.last_warning is None
    assert out.dtype == np.float32 and out.shape == (10 * len(world), 5)
    # Where the current lidar (k = 13) sees every world point: the reference for all sweeps.
    expected = observe(world, pose(13), ids).astype(np.float64)
    runs = blocks(out)
    assert len(runs) == 10
    for j, (lag, block) in enumerate(runs):
        # Current first (lag 0), then newest to oldest: lag j * 50 ms, exactly as float32.
        assert lag == np.float32(j * 0.05)
        assert np.all(block[:, 4] == np.float32(j * 0.05))
        order = block[:, 3].astype(np.int64)
        assert np.array_equal(np.sort(order), np.arange(len(world)))
        assert np.allclose(block[:, :3], expected[order, :3], atol=2e-4)
    # Without compensation the past sweeps would be far off (the lidar moved ~6 m).
    oldest = runs[-1][1]
    raw = observe(world, pose(4), ids)
    assert np.abs(oldest[:, :3] - raw[oldest[:, 3].astype(np.int64), :3]).max() > 1.0


def test_first_sweep_and_growing_history(scene):
    world, ids = scene
    acc = SweepAccumulator(num_sweeps=10)
    for k in range(12):
        out = acc.add(observe(world, pose(k), ids), T0 + k * PERIOD, pose(k))
        assert len(blocks(out)) == min(k + 1, 10)
        assert len(out) == min(k + 1, 10) * len(world)
    assert len(acc) == 9                                      # bounded: num_sweeps - 1 stored


@pytest.mark.parametrize("num_sweeps", [1, 2, 4])
def test_num_sweeps_bound(scene, num_sweeps):
    world, ids = scene
    acc = SweepAccumulator(num_sweeps=num_sweeps)
    for k in range(15):
        out = acc.add(observe(world, pose(k), ids), T0 + k * PERIOD, pose(k))
    lags = [lag for lag, _ in blocks(out)]
    assert lags == [np.float32(j * 0.05) for j in range(num_sweeps)]
    assert len(acc) == num_sweeps - 1


def test_num_sweeps_one_is_the_current_sweep_with_zero_lag():
    acc = SweepAccumulator(num_sweeps=1)
    points = np.array([[0.1, 0.2, 0.3, 9.0, 31.0], [5, 6, 7, 8, 0]], dtype=np.float32)
    for k in range(3):
        out = acc.add(points, T0 + k * PERIOD, None)          # no pose needed
        assert acc.last_warning is None
    assert np.array_equal(out, np.hstack([points[:, :4], np.zeros((2, 1), np.float32)]))


def test_close_points_removed_from_past_sweeps_only():
    acc = SweepAccumulator()
    identity = np.eye(4)
    points = np.array([
        [0.5, 0.5, 0.0, 1.0],      # inside the 1 m box: dropped from past sweeps
        [-0.99, 0.99, 2.0, 2.0],   # inside
        [0.0, 0.0, -1.5, 3.0],     # inside (z does not matter)
        [1.0, 0.0, 0.0, 4.0],      # |x| = 1 is not < 1: kept
        [0.5, -1.0, 0.0, 5.0],     # |y| = 1: kept
        [0.2, 3.0, 0.0, 6.0],      # |y| > 1: kept
        [10.0, 10.0, 1.0, 7.0],    # far: kept
    ], dtype=np.float32)
    first = acc.add(points, T0, identity)
    assert np.array_equal(first[:, :4], points)               # current sweep: not filtered
    out = acc.add(points, T0 + PERIOD, identity)
    current, past = out[:7], out[7:]
    assert np.array_equal(current[:, :4], points)
    assert np.all(current[:, 4] == 0)
    assert sorted(past[:, 3].tolist()) == [4.0, 5.0, 6.0, 7.0]
    assert np.allclose(past[:, 4], 0.05)


def test_close_box_is_in_the_past_sweeps_own_frame():
    # The lidar moved 3 m forward (+x) between the two sweeps.
    pose0, pose1 = np.eye(4), np.eye(4)
    pose1[:3, 3] = (3.0, 0.0, 0.0)
    past = np.array([[0.5, 0.5, 0.0, 1.0],    # close in its own frame; at (-2.5, 0.5) now: dropped
                     [3.2, 0.3, 0.0, 2.0]],   # far in its own frame; at (0.2, 0.3) now: kept
                    dtype=np.float32)
    acc = SweepAccumulator()
    acc.add(past, T0, pose0)
    out = acc.add(np.array([[20.0, 0.0, 0.0, 9.0]], np.float32), T0 + PERIOD, pose1)
    assert out.shape == (2, 5)
    assert np.allclose(out[1], [0.2, 0.3, 0.0, 2.0, 0.05], atol=1e-6)


def test_custom_close_radius():
    acc = SweepAccumulator(close_radius_m=2.0)
    points = np.array([[1.5, -1.5, 0, 1], [2.5, 0, 0, 2]], np.float32)
    acc.add(points, T0, np.eye(4))
    out = acc.add(points, T0 + PERIOD, np.eye(4))
    assert out[2:, 3].tolist() == [2.0]


def test_max_age():
    points = np.array([[5.0, 5.0, 0.0, 1.0]], np.float32)
    acc = SweepAccumulator(num_sweeps=10, max_age_s=1.0)
    for k in range(6):                                        # 2 Hz: 0, 0.5, ..., 2.5 s
        out = acc.add(points, T0 + k * S // 2, np.eye(4))
    # Lags 0, 0.5 and exactly 1.0 s are kept; 1.5 s and older are too old.
    assert out[:, 4].tolist() == [0.0, 0.5, 1.0]
    assert acc.last_warning is None
    # A long gap (sensor dropout) leaves no usable history.
    out = acc.add(points, T0 + 10 * S, np.eye(4))
    assert out[:, 4].tolist() == [0.0]


def test_missing_pose_returns_current_only_and_warns(scene):
    world, ids = scene
    acc = SweepAccumulator(num_sweeps=3)
    out = acc.add(observe(world, pose(0), ids), T0, None)
    assert len(out) == len(world) and acc.last_warning is None   # nothing to compensate yet
    out = acc.add(observe(world, pose(1), ids), T0 + PERIOD, pose(1))
    assert len(out) == len(world) and np.all(out[:, 4] == 0)
    assert "pose" in acc.last_warning and "past sweep" in acc.last_warning
    out = acc.add(observe(world, pose(2), ids), T0 + 2 * PERIOD, None)
    assert len(out) == len(world) and np.all(out[:, 4] == 0)
    assert "current sweep" in acc.last_warning
    # Only the pose-less past sweep is left out (defect: one sweep without a pose dropped every
    # past sweep); it leaves the window (num_sweeps - 1 = 2 past sweeps) after two more sweeps.
    for k, used in ((3, 1), (4, 3)):                           # sweep 2 (no pose) still a past one
        out = acc.add(observe(world, pose(k), ids), T0 + k * PERIOD, pose(k))
        assert "1 past sweep" in acc.last_warning and "1 of 2" in acc.last_warning
        assert [lag for lag, _ in blocks(out)] == pytest.approx([0.0, (k - used) * PERIOD / S])
        assert len(out) == 2 * len(world)
    out = acc.add(observe(world, pose(5), ids), T0 + 5 * PERIOD, pose(5))
    assert acc.last_warning is None and len(blocks(out)) == 3
    expected = observe(world, pose(5), ids)
    for _, block in blocks(out):
        assert np.allclose(block[:, :3], expected[block[:, 3].astype(np.int64), :3], atol=2e-4)


def test_backwards_stamp_resets_history(scene):
    world, ids = scene
    acc = SweepAccumulator()
    for k in range(5):
        acc.add(observe(world, pose(k), ids), T0 + k * PERIOD, pose(k))
    # The bag loops back to its start.
    out = acc.add(observe(world, pose(0), ids), T0, pose(0))
    assert len(out) == len(world) and np.all(out[:, 4] == 0)
    assert "backwards" in acc.last_warning
    assert acc.stored_stamps == [T0]
    out = acc.add(observe(world, pose(1), ids), T0 + PERIOD, pose(1))
    assert acc.last_warning is None
    assert [lag for lag, _ in blocks(out)] == [0.0, np.float32(0.05)]


def test_repeated_stamp_is_not_a_past_sweep():
    points = np.array([[5.0, 5.0, 0.0, 1.0]], np.float32)
    acc = SweepAccumulator()
    acc.add(points, T0, np.eye(4))
    acc.add(points * 2, T0 + PERIOD, np.eye(4))
    out = acc.add(points * 3, T0 + PERIOD, np.eye(4))         # same stamp again
    assert out[:, 4].tolist() == [0.0, pytest.approx(0.05)]
    assert np.allclose(out[1, :3], points[0, :3])             # the sweep at T0, not the duplicate
    assert acc.stored_stamps == [T0, T0 + PERIOD]


def test_extra_columns_dropped_and_input_not_modified():
    points = np.array([[5.0, 1.0, 0.5, 42.0, 17.0], [0.2, 0.1, 0.0, 7.0, 3.0]], np.float64)
    copy = points.copy()
    acc = SweepAccumulator()
    out = acc.add(points, T0, np.eye(4))
    assert out.dtype == np.float32 and out.shape == (2, 5)
    assert np.array_equal(out[:, :4], points[:, :4].astype(np.float32)) and np.all(out[:, 4] == 0)
    assert np.array_equal(points, copy)


def test_empty_sweeps():
    acc = SweepAccumulator()
    out = acc.add(np.zeros((0, 4), np.float32), T0, np.eye(4))
    assert out.shape == (0, 5) and out.dtype == np.float32
    out = acc.add(np.array([[3.0, 3.0, 0.0, 1.0]], np.float32), T0 + PERIOD, np.eye(4))
    assert out.shape == (1, 5)


def test_input_validation():
    acc = SweepAccumulator()
    with pytest.raises(ValueError):
        acc.add(np.zeros((5, 3), np.float32), T0, np.eye(4))
    with pytest.raises(ValueError):
        acc.add(np.zeros((5, 4), np.float32), T0, np.eye(3))
    with pytest.raises(ValueError):
        acc.add(np.zeros((5, 4), np.float32), T0, np.full((4, 4), np.nan))
    for kwargs in ({"num_sweeps": 0}, {"num_sweeps": 2.5}, {"close_radius_m": -1.0}, {"max_age_s": 0.0}):
        with pytest.raises(ValueError):
            SweepAccumulator(**kwargs)


def test_remember_stores_a_past_sweep_like_add():
    """A sweep only remembered (its frame was dropped by the node) is a past sweep of the next."""
    rng = np.random.default_rng(5)
    first, second = (rng.uniform(-20, 20, (50, 4)).astype(np.float32) for _ in range(2))
    pose_a, pose_b = np.eye(4), np.eye(4)
    pose_b[0, 3] = 2.0
    added, remembered = SweepAccumulator(3), SweepAccumulator(3)
    added.add(first, 0, pose_a)
    remembered.remember(first, 0, pose_a)
    np.testing.assert_array_equal(remembered.add(second, 50_000_000, pose_b), added.add(second, 50_000_000, pose_b))
    assert remembered.stored_stamps == added.stored_stamps == [0, 50_000_000]


def test_refresh_poses_brings_back_a_sweep_whose_odometry_came_late(scene):
    """A sweep stored before its odometry arrived is used once refresh_poses finds the pose."""
    world, ids = scene
    acc = SweepAccumulator(num_sweeps=3)
    acc.add(observe(world, pose(0), ids), T0, pose(0))
    acc.add(observe(world, pose(1), ids), T0 + PERIOD, None)          # its pose not there yet
    late = {T0 + PERIOD: pose(1)}
    acc.refresh_poses(lambda stamp: late.get(stamp))
    out = acc.add(observe(world, pose(2), ids), T0 + 2 * PERIOD, pose(2))
    assert acc.last_warning is None and len(blocks(out)) == 3
    expected = observe(world, pose(2), ids)
    for _, block in blocks(out):
        assert np.allclose(block[:, :3], expected[block[:, 3].astype(np.int64), :3], atol=2e-4)
    acc.refresh_poses(lambda stamp: pytest.fail("every stored sweep has a pose: no lookup"))
