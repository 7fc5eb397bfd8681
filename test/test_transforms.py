"""TransformBuffer: tf2-like chaining, interpolation, errors; quaternion helpers.

References are built independently in float64: rotations from Rodrigues' formula or the
closed-form rotation about z, and chains multiplied out by hand.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from bevfusion_ros.streaming.transforms import (
    ConnectivityError,
    ExtrapolationError,
    TransformBuffer,
    TransformError,
    interpolate_transform,
    invert_transform,
    matrix_from_quaternion,
    quaternion_from_matrix,
    slerp,
    transform_from_translation_quaternion,
)

S = 1_000_000_000   # ns per second


def rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rodrigues(axis, angle: float) -> np.ndarray:
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def make(rotation: np.ndarray, translation) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = translation
    return m


def random_transform(rng: np.random.Generator) -> np.ndarray:
    return make(rodrigues(rng.normal(size=3), rng.uniform(-math.pi, math.pi)), rng.normal(size=3) * 5)


def inv(m: np.ndarray) -> np.ndarray:
    return np.linalg.inv(m)            # general inverse, independent of invert_transform


# ------------------------------------------------------------------ quaternion helpers

def test_quaternion_of_rotation_about_z_is_the_textbook_one():
    for angle in (0.0, 0.3, -1.2, math.pi / 2, 3.0):
        q = quaternion_from_matrix(rot_z(angle))
        expected = np.array([0.0, 0.0, math.sin(angle / 2), math.cos(angle / 2)])
        assert np.allclose(q, expected, atol=1e-12) or np.allclose(q, -expected, atol=1e-12)


@pytest.mark.parametrize("axis", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, -2, 3)])
@pytest.mark.parametrize("angle", [0.0, 1e-7, 0.5, 2.0, math.pi - 1e-9, math.pi])
def test_matrix_quaternion_round_trip_all_shepperd_branches(axis, angle):
    r = rodrigues(axis, angle)
    q = quaternion_from_matrix(r)
    assert abs(np.linalg.norm(q) - 1.0) < 1e-12
    assert np.allclose(matrix_from_quaternion(q), r, atol=1e-12)
    # The quaternion of a rotation by `angle` about `axis` is (sin(a/2) k, cos(a/2)) up to sign.
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    expected = np.append(math.sin(angle / 2) * k, math.cos(angle / 2))
    assert min(np.abs(q - expected).max(), np.abs(q + expected).max()) < 1e-9


def test_random_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = random_transform(rng)
        q = quaternion_from_matrix(m)
        assert np.allclose(matrix_from_quaternion(q), m[:3, :3], atol=1e-12)
        assert np.allclose(transform_from_translation_quaternion(m[:3, 3], q), m, atol=1e-12)
        assert np.allclose(invert_transform(m), inv(m), atol=1e-12)


def test_matrix_from_quaternion_normalises_and_rejects_zero():
    q = np.array([0.0, 0.0, math.sin(0.4), math.cos(0.4)]) * 3.0
    assert np.allclose(matrix_from_quaternion(q), rot_z(0.8), atol=1e-12)
    with pytest.raises(TransformError):
        matrix_from_quaternion([0.0, 0.0, 0.0, 0.0])


def test_slerp_about_a_fixed_axis_interpolates_the_angle():
    axis = np.array([1.0, 2.0, -0.5])
    q0 = quaternion_from_matrix(rodrigues(axis, 0.2))
    q1 = quaternion_from_matrix(rodrigues(axis, 1.4))
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        expected = rodrigues(axis, 0.2 + t * 1.2)
        assert np.allclose(matrix_from_quaternion(slerp(q0, q1, t)), expected, atol=1e-12)
    # The same rotation given with the opposite quaternion sign interpolates identically.
    flipped = matrix_from_quaternion(slerp(q0, -q1, 0.3))
    assert np.allclose(flipped, rodrigues(axis, 0.2 + 0.3 * 1.2), atol=1e-12)


def test_slerp_179_to_minus_179_takes_the_short_path():
    a0, a1 = math.radians(179.0), math.radians(-179.0)
    m0, m1 = make(rot_z(a0), [0, 0, 0]), make(rot_z(a1), [0, 0, 0])
    # The short way from 179 to -179 deg passes through 180 deg (2 deg), not through 0 (358 deg).
    mid = interpolate_transform(m0, m1, 0.5)
    assert np.allclose(mid[:3, :3], rot_z(math.pi), atol=1e-12)
    quarter = interpolate_transform(m0, m1, 0.25)
    assert np.allclose(quarter[:3, :3], rot_z(math.radians(179.5)), atol=1e-12)
    assert not np.allclose(mid[:3, :3], np.eye(3), atol=1e-3)


def test_slerp_nearly_equal_rotations():
    m0, m1 = make(rot_z(0.1), [0, 0, 0]), make(rot_z(0.1 + 1e-8), [0, 0, 0])
    assert np.allclose(interpolate_transform(m0, m1, 0.5)[:3, :3], rot_z(0.1 + 5e-9), atol=1e-14)


# ------------------------------------------------------------------ the tree

@pytest.fixture
def robot():
    """map -(static)-> odom -(dynamic)-> base_link -(static)-> lidar, base_link -(static)-> camera."""
    rng = np.random.default_rng(42)
    m = {
        "map_odom": random_transform(rng),
        "odom_base0": make(rot_z(math.radians(10)), [1.0, 2.0, 0.0]),      # at t = 100 s
        "odom_base1": make(rot_z(math.radians(50)), [3.0, 6.0, 1.0]),      # at t = 101 s
        "base_lidar": random_transform(rng),
        "base_camera": random_transform(rng),
    }
    buffer = TransformBuffer(cache_time_s=10.0)
    buffer.set_transform("map", "odom", 0, m["map_odom"], static=True)
    buffer.set_transform("odom", "base_link", 100 * S, m["odom_base0"], static=False)
    buffer.set_transform("odom", "base_link", 101 * S, m["odom_base1"], static=False)
    buffer.set_transform("base_link", "lidar", 0, m["base_lidar"], static=True)
    buffer.set_transform("base_link", "camera", 0, m["base_camera"], static=True)
    return buffer, m


def test_frames(robot):
    buffer, _ = robot
    assert buffer.frames() == {"map", "odom", "base_link", "lidar", "camera"}


def test_lookup_chain_down_and_up(robot):
    buffer, m = robot
    map_T_lidar = m["map_odom"] @ m["odom_base0"] @ m["base_lidar"]
    assert np.allclose(buffer.lookup("map", "lidar", 100 * S), map_T_lidar, atol=1e-12)
    assert np.allclose(buffer.lookup("lidar", "map", 100 * S), inv(map_T_lidar), atol=1e-12)
    assert np.allclose(buffer.lookup("odom", "base_link", 101 * S), m["odom_base1"], atol=1e-12)
    assert np.allclose(buffer.lookup("base_link", "odom", 101 * S), inv(m["odom_base1"]), atol=1e-12)


def test_lookup_between_siblings(robot):
    buffer, m = robot
    # lidar_T_camera = inv(base_T_lidar) @ base_T_camera, computed by hand.
    expected = inv(m["base_lidar"]) @ m["base_camera"]
    assert np.allclose(buffer.lookup("lidar", "camera", 100 * S), expected, atol=1e-12)
    assert np.allclose(buffer.lookup("camera", "lidar", 100 * S), inv(expected), atol=1e-12)
    # A camera point mapped into lidar then back lands where it started.
    p = np.array([1.0, -2.0, 7.0, 1.0])
    round_trip = buffer.lookup("camera", "lidar", 0) @ buffer.lookup("lidar", "camera", 0) @ p
    assert np.allclose(round_trip, p, atol=1e-12)


def test_lookup_same_frame_is_identity(robot):
    buffer, _ = robot
    assert np.array_equal(buffer.lookup("lidar", "lidar", 12345), np.eye(4))


def test_static_edges_ignore_time(robot):
    buffer, m = robot
    expected = inv(m["base_lidar"]) @ m["base_camera"]
    for stamp in (0, 1, 5 * S, 10_000 * S):
        assert np.allclose(buffer.lookup("lidar", "camera", stamp), expected, atol=1e-12)
    assert buffer.can_transform("odom", "map", 3)
    assert buffer.latest_common_stamp("lidar", "camera") == 0


def test_interpolation_at_midpoint_and_quarter(robot):
    buffer, m = robot
    # Mean angle 30 deg, mean translation (2, 4, 0.5).
    mid = buffer.lookup("odom", "base_link", 100 * S + S // 2)
    assert np.allclose(mid, make(rot_z(math.radians(30)), [2.0, 4.0, 0.5]), atol=1e-12)
    quarter = buffer.lookup("odom", "base_link", 100 * S + S // 4)
    assert np.allclose(quarter, make(rot_z(math.radians(20)), [1.5, 3.0, 0.25]), atol=1e-12)
    # Through the chain: map_T_lidar at the midpoint.
    expected = m["map_odom"] @ make(rot_z(math.radians(30)), [2.0, 4.0, 0.5]) @ m["base_lidar"]
    assert np.allclose(buffer.lookup("map", "lidar", 100 * S + S // 2), expected, atol=1e-12)


def test_interpolation_across_the_pi_wrap():
    buffer = TransformBuffer()
    buffer.set_transform("odom", "base", 0 * S + 1, make(rot_z(math.radians(179)), [0, 0, 0]), static=False)
    buffer.set_transform("odom", "base", 1 * S + 1, make(rot_z(math.radians(-179)), [2, 0, 0]), static=False)
    mid = buffer.lookup("odom", "base", S // 2 + 1)
    assert np.allclose(mid, make(rot_z(math.pi), [1, 0, 0]), atol=1e-12)


def test_exact_endpoints_allowed_beyond_raise(robot):
    buffer, m = robot
    assert np.allclose(buffer.lookup("odom", "base_link", 100 * S), m["odom_base0"], atol=1e-15)
    assert np.allclose(buffer.lookup("odom", "base_link", 101 * S), m["odom_base1"], atol=1e-15)
    with pytest.raises(ExtrapolationError, match="past"):
        buffer.lookup("odom", "base_link", 100 * S - 1)
    with pytest.raises(ExtrapolationError, match="future"):
        buffer.lookup("map", "lidar", 101 * S + 1)
    with pytest.raises(LookupError):                  # ExtrapolationError is a LookupError
        buffer.lookup("camera", "odom", 200 * S)
    assert not buffer.can_transform("camera", "odom", 200 * S)
    assert buffer.can_transform("camera", "odom", 100 * S + 7)
    # Siblings below the dynamic edge need no dynamic data at all.
    assert buffer.can_transform("camera", "lidar", 200 * S)


def test_extrapolation_tolerance():
    buffer = TransformBuffer(extrapolation_tolerance_ns=1_000_000)     # 1 ms
    first, last = make(rot_z(0.1), [0, 0, 0]), make(rot_z(0.3), [1, 0, 0])
    buffer.set_transform("odom", "base", 10 * S, first, static=False)
    buffer.set_transform("odom", "base", 11 * S, last, static=False)
    assert np.allclose(buffer.lookup("odom", "base", 10 * S - 1_000_000), first)
    assert np.allclose(buffer.lookup("odom", "base", 11 * S + 999_999), last)
    with pytest.raises(ExtrapolationError):
        buffer.lookup("odom", "base", 11 * S + 1_000_001)


def test_single_sample_only_at_its_stamp():
    buffer = TransformBuffer()
    m = make(rot_z(0.7), [1, 2, 3])
    buffer.set_transform("odom", "base", 5 * S, m, static=False)
    assert np.allclose(buffer.lookup("base", "odom", 5 * S), inv(m))
    assert np.allclose(buffer.lookup("base", "odom", 0), inv(m))
    with pytest.raises(ExtrapolationError):
        buffer.lookup("base", "odom", 5 * S + 1)


def test_stamp_zero_is_latest_common_time():
    buffer = TransformBuffer()
    # odom -> base known at 0..2 s; base -> lidar (dynamic, e.g. a spinning mount) at 0..1.5 s.
    for k, t in enumerate((0, S, 2 * S)):
        buffer.set_transform("odom", "base", t + 1, make(rot_z(0.2 * k), [k, 0, 0]), static=False)
    buffer.set_transform("base", "lidar", 1, make(rot_z(0.0), [0, 0, 1]), static=False)
    buffer.set_transform("base", "lidar", 3 * S // 2 + 1, make(rot_z(0.6), [0, 0, 1]), static=False)
    assert buffer.latest_common_stamp("odom", "lidar") == 3 * S // 2 + 1
    expected = make(rot_z(0.3), [1.5, 0, 0]) @ make(rot_z(0.6), [0, 0, 1])
    assert np.allclose(buffer.lookup("odom", "lidar", 0), expected, atol=1e-12)
    # With one dynamic edge, stamp 0 is its newest sample.
    assert np.allclose(buffer.lookup("odom", "base", 0), make(rot_z(0.4), [2, 0, 0]), atol=1e-12)


def test_unknown_and_disconnected_frames():
    buffer = TransformBuffer()
    buffer.set_transform("map", "odom", 0, np.eye(4), static=True)
    buffer.set_transform("world", "sensor_rig", 0, np.eye(4), static=True)
    with pytest.raises(ConnectivityError, match="nowhere"):
        buffer.lookup("map", "nowhere", 0)
    with pytest.raises(ConnectivityError, match="different trees"):
        buffer.lookup("odom", "sensor_rig", 0)
    with pytest.raises(LookupError):
        buffer.lookup("map", "world", 0)
    assert not buffer.can_transform("odom", "sensor_rig", 0)
    assert not buffer.can_transform("nowhere", "nowhere", 0)


@pytest.mark.parametrize("bad", [
    np.full((4, 4), np.nan),
    make(np.eye(3), [np.inf, 0, 0]),
    np.eye(3),                                              # wrong shape
    np.vstack([make(np.eye(3), [1, 2, 3])[:3], [0, 0, 1e-3, 1]]),   # bottom row
    make(np.eye(3) * 1.001, [0, 0, 0]),                     # scaled
    make(np.diag([1.0, 1.0, -1.0]), [0, 0, 0]),             # reflection, det -1
    make(np.array([[1.0, 1e-3, 0], [0, 1, 0], [0, 0, 1]]), [0, 0, 0]),   # sheared
])
def test_invalid_matrices_rejected(bad):
    buffer = TransformBuffer()
    with pytest.raises(TransformError):
        buffer.set_transform("a", "b", 1, bad, static=False)
    with pytest.raises(ValueError):                          # TransformError is a ValueError
        buffer.set_transform("a", "b", 0, bad, static=True)
    assert buffer.frames() == set()


def test_nearly_orthonormal_accepted():
    r = rot_z(0.3) + 1e-7                                   # float noise from a message
    buffer = TransformBuffer()
    buffer.set_transform("a", "b", 0, make(r, [0, 0, 0]), static=True)
    assert buffer.can_transform("a", "b", 0)


def test_tree_rules():
    buffer = TransformBuffer()
    buffer.set_transform("base_link", "lidar", 0, np.eye(4), static=True)
    buffer.set_transform("base_link", "lidar", 0, make(rot_z(0.1), [1, 0, 0]), static=True)   # update ok
    with pytest.raises(TransformError, match="parent"):
        buffer.set_transform("odom", "lidar", 0, np.eye(4), static=True)
    buffer.set_transform("odom", "base_link", 1, np.eye(4), static=False)
    with pytest.raises(TransformError, match="cycle"):
        buffer.set_transform("lidar", "odom", 1, np.eye(4), static=False)
    with pytest.raises(TransformError):
        buffer.set_transform("odom", "odom", 0, np.eye(4), static=True)
    assert np.allclose(buffer.lookup("base_link", "lidar", 0), make(rot_z(0.1), [1, 0, 0]))


def test_leading_slash_ignored():
    buffer = TransformBuffer()
    buffer.set_transform("/map", "odom", 0, make(np.eye(3), [1, 0, 0]), static=True)
    assert np.allclose(buffer.lookup("map", "/odom", 0), make(np.eye(3), [1, 0, 0]))


def test_cache_pruning():
    buffer = TransformBuffer(cache_time_s=1.0)
    for k in range(7):                                        # 0, 0.5, ..., 3.0 s
        buffer.set_transform("odom", "base", k * S // 2, make(rot_z(0.1 * k), [k, 0, 0]), static=False)
    with pytest.raises(ExtrapolationError):
        buffer.lookup("odom", "base", 3 * S // 2)             # 1.5 s: pruned (> 1 s behind 3.0 s)
    assert np.allclose(buffer.lookup("odom", "base", 2 * S), make(rot_z(0.4), [4, 0, 0]))   # kept
    assert np.allclose(buffer.lookup("odom", "base", 9 * S // 4), make(rot_z(0.45), [4.5, 0, 0]))


def test_out_of_order_sample_within_cache_is_inserted():
    buffer = TransformBuffer(cache_time_s=10.0)
    buffer.set_transform("odom", "base", 2 * S, make(rot_z(0.2), [2, 0, 0]), static=False)
    buffer.set_transform("odom", "base", 0, make(rot_z(0.0), [0, 0, 0]), static=False)
    buffer.set_transform("odom", "base", 1 * S, make(rot_z(0.4), [4, 0, 0]), static=False)
    assert np.allclose(buffer.lookup("odom", "base", S // 2), make(rot_z(0.2), [2, 0, 0]), atol=1e-12)
    assert np.allclose(buffer.lookup("odom", "base", 3 * S // 2), make(rot_z(0.3), [3, 0, 0]), atol=1e-12)
    # A repeated stamp replaces the sample.
    buffer.set_transform("odom", "base", 1 * S, make(rot_z(0.1), [1, 0, 0]), static=False)
    assert np.allclose(buffer.lookup("odom", "base", 1 * S), make(rot_z(0.1), [1, 0, 0]))


def test_bag_loop_resets_the_edge():
    buffer = TransformBuffer(cache_time_s=2.0)
    buffer.set_transform("odom", "base", 19 * S, make(rot_z(0.0), [0, 0, 0]), static=False)
    buffer.set_transform("odom", "base", 20 * S, make(rot_z(0.2), [2, 0, 0]), static=False)
    # The bag starts over: 5 s is 15 s older than the newest (20 s), beyond the 2 s cache.
    buffer.set_transform("odom", "base", 5 * S, make(rot_z(1.0), [5, 0, 0]), static=False)
    buffer.set_transform("odom", "base", 6 * S, make(rot_z(1.2), [6, 0, 0]), static=False)
    with pytest.raises(ExtrapolationError):
        buffer.lookup("odom", "base", 20 * S)
    assert np.allclose(buffer.lookup("odom", "base", 11 * S // 2), make(rot_z(1.1), [5.5, 0, 0]), atol=1e-12)
    assert np.allclose(buffer.lookup("odom", "base", 0), make(rot_z(1.2), [6, 0, 0]), atol=1e-12)


def test_static_replaces_dynamic_and_back():
    buffer = TransformBuffer()
    buffer.set_transform("odom", "base", 1 * S, make(rot_z(0.1), [1, 0, 0]), static=False)
    buffer.set_transform("odom", "base", 0, make(rot_z(0.5), [5, 0, 0]), static=True)
    assert np.allclose(buffer.lookup("odom", "base", 77 * S), make(rot_z(0.5), [5, 0, 0]))
    buffer.set_transform("odom", "base", 3 * S, make(rot_z(0.3), [3, 0, 0]), static=False)
    with pytest.raises(ExtrapolationError):
        buffer.lookup("odom", "base", 77 * S)


def test_constructor_validation():
    with pytest.raises(ValueError):
        TransformBuffer(cache_time_s=0)
    with pytest.raises(ValueError):
        TransformBuffer(extrapolation_tolerance_ns=-1)


def test_wait_for_transform_returns_once_the_sample_arrives_from_another_thread():
    """The worker waits for odometry at a sweep's stamp that a /tf callback delivers later."""
    import threading
    buffer = TransformBuffer()
    pose = np.eye(4)
    pose[:3, 3] = [1.0, 2.0, 0.0]
    buffer.set_transform("odom", "lidar", 100, np.eye(4))
    waiting = threading.Event()
    result: list[np.ndarray] = []

    def worker() -> None:
        waiting.set()
        result.append(buffer.wait_for_transform("odom", "lidar", 200, timeout_s=30.0))

    thread = threading.Thread(target=worker)
    thread.start()
    waiting.wait()
    buffer.set_transform("odom", "lidar", 200, pose)      # the sample at the sweep's stamp
    thread.join(timeout=30.0)
    assert not thread.is_alive()
    np.testing.assert_allclose(result[0], pose)


def test_wait_for_transform_gives_the_lookup_error_after_the_timeout():
    from bevfusion_ros.streaming.transforms import ExtrapolationError
    buffer = TransformBuffer()
    buffer.set_transform("odom", "lidar", 100, np.eye(4))
    with pytest.raises(ExtrapolationError):
        buffer.wait_for_transform("odom", "lidar", 200, timeout_s=0.01)
    with pytest.raises(LookupError):
        buffer.wait_for_transform("odom", "nowhere", 100, timeout_s=0.0)
    np.testing.assert_allclose(buffer.wait_for_transform("odom", "lidar", 100, timeout_s=0.0), np.eye(4))
