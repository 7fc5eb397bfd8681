"""Detections: REP-103 conversion (spec 6.5), corners, JSON."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bevfusion_ros.config import NUSCENES_CLASS_NAMES
from bevfusion_ros.detections import Detections, wrap_angle


def box(x=0.0, y=0.0, z=0.0, w=1.9, l=4.6, h=1.5, yaw=0.0, vx=0.0, vy=0.0, label=0, score=0.5):
    return [x, y, z, w, l, h, yaw, vx, vy, label, score]


def detections(*rows, **header):
    return Detections(np.array(rows, dtype=np.float32).reshape(-1, 11), NUSCENES_CLASS_NAMES, **header)


def random_detections(seed, count):
    rng = np.random.default_rng(seed)
    rows = [box(*rng.uniform(-50, 50, 2), rng.uniform(-3, 1), *rng.uniform(0.3, 12, 3),
                rng.uniform(-math.pi, math.pi), *rng.normal(0, 5, 2), rng.integers(0, 10), rng.random())
            for _ in range(count)]
    return detections(*rows, stamp_ns=1_700_000_000_123_456_789, frame_id="LIDAR_TOP",
                      stage_ms={"voxelize": 1.5, "head": 12.25}, cameras_used=("FRONT", "BACK"),
                      warnings=("dropped 3 points with NaN/inf values",))


def test_third_party_car_heads_along_its_velocity():
    # Spec 6.5: a car with CUDA yaw 1.292 moving at (-12.98, -3.70) m/s has psi = -2.863 rad.
    (car,) = detections(box(x=-5, y=8, z=-0.9, w=1.9, l=4.6, h=1.5, yaw=1.292, vx=-12.98, vy=-3.70,
                            label=0, score=0.8)).to_rep103()
    assert car["yaw"] == pytest.approx(-2.863, abs=1e-3)
    heading = np.array([math.cos(car["yaw"]), math.sin(car["yaw"])])
    velocity = np.array(car["velocity"]) / np.hypot(*car["velocity"])
    np.testing.assert_allclose(heading, velocity, atol=2e-3)
    assert car["label"] == "car" and car["score"] == pytest.approx(0.8)
    np.testing.assert_allclose(car["center"], [-5, 8, -0.9], rtol=1e-6)       # z stays the centre
    np.testing.assert_allclose(car["size"], [4.6, 1.9, 1.5], rtol=1e-6)       # length, width, height


def test_heading_is_wrapped_to_minus_pi_exclusive_pi_inclusive():
    yaws = np.array([-1.5 * math.pi + 0.1, math.pi / 2, 0.0, -math.pi, math.pi, 2.9])
    headings = detections(*[box(yaw=yaw) for yaw in yaws]).headings()
    np.testing.assert_allclose(headings, [math.pi - 0.1, math.pi, -math.pi / 2, math.pi / 2, math.pi / 2,
                                          -2.9 - math.pi / 2 + 2 * math.pi], atol=1e-6)
    assert np.all((headings > -math.pi) & (headings <= math.pi))
    assert wrap_angle(-math.pi) == math.pi and wrap_angle(7.0) == pytest.approx(7.0 - 2 * math.pi)


def test_corners_put_the_length_along_the_heading():
    dets = random_detections(1, 20)
    corners = dets.corners_lidar()
    boxes = dets.boxes.astype(np.float64)
    headings = np.stack([np.cos(dets.headings()), np.sin(dets.headings())], axis=1)
    front, side = corners[:, 0, :2] - corners[:, 1, :2], corners[:, 1, :2] - corners[:, 2, :2]
    np.testing.assert_allclose(np.linalg.norm(front, axis=1), boxes[:, 3], rtol=1e-9)   # width w
    np.testing.assert_allclose(side, headings * boxes[:, 4:5], atol=1e-9)             # length l along psi
    np.testing.assert_allclose(corners[:, 4:] - corners[:, :4], np.broadcast_to(
        [0, 0, 1], (20, 4, 3)) * boxes[:, None, None, 5], atol=1e-9)                  # top = bottom + h
    np.testing.assert_allclose(corners.mean(axis=1), boxes[:, :3], atol=1e-9)       # z is the centre


def test_footprint_equals_mmdet3d_clockwise_corners():
    # mmdet3d LiDAR boxes (spec 6.5): corner = centre + (dx cos + dy sin, -dx sin + dy cos),
    # dx = +-w/2 along local x, dy = +-l/2 along local y, yaw clockwise.
    dets = random_detections(2, 10)
    for footprint, (x, y, _, w, l, _, yaw, *_) in zip(dets.corners_lidar()[:, :4, :2], dets.boxes):
        cos, sin = math.cos(yaw), math.sin(yaw)
        expected = [(x + dx * cos + dy * sin, y - dx * sin + dy * cos)
                    for dx in (-w / 2, w / 2) for dy in (-l / 2, l / 2)]
        np.testing.assert_allclose(sorted(map(tuple, footprint)), sorted(expected), atol=1e-5)


def test_json_round_trip(tmp_path):
    dets = random_detections(3, 15)
    path = tmp_path / "detections.json"
    dets.to_json(path)
    document = json.loads(path.read_text())
    assert document["boxes"] == dets.to_rep103()
    assert document["stamp_ns"] == 1_700_000_000_123_456_789 and document["frame_id"] == "LIDAR_TOP"
    loaded = Detections.from_json(path)
    header = ("class_names", "stamp_ns", "frame_id", "stage_ms", "cameras_used", "warnings")
    assert [getattr(loaded, name) for name in header] == [getattr(dets, name) for name in header]
    others = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10]
    np.testing.assert_array_equal(loaded.boxes[:, others], dets.boxes[:, others])
    np.testing.assert_allclose(wrap_angle(loaded.boxes[:, 6] - dets.boxes[:, 6]), 0, atol=1e-6)
    empty = detections()
    empty.to_json(path)
    assert len(Detections.from_json(path)) == 0


def test_rejects_malformed_boxes():
    with pytest.raises(ValueError, match=r"boxes must be \[M, 11\]"):
        Detections(np.zeros((2, 9), np.float32), NUSCENES_CLASS_NAMES)
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 10\)"):
        detections(box(label=10))


def rotation_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Rz(yaw) @ Ry(pitch) @ Rx(roll), float64, written out element by element."""
    cr, sr, cp, sp, cy, sy = (f(a) for a in (roll, pitch, yaw) for f in (math.cos, math.sin))
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(rotation: np.ndarray, translation) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rotation, translation
    return matrix


def test_boxes_moved_by_a_yaw_transform_have_the_moved_corners_and_rotated_velocities():
    """base_link_T_lidar of a nuScenes-like mounting (lidar turned ~-90 deg, 1.84 m up): every
    corner of every box is the lidar-frame corner moved by the transform (float64 loop), the
    heading turns by the transform's yaw and the velocity is rotated, not translated."""
    source = random_detections(3, 40)
    yaw = -1.5732
    matrix = rigid(rotation_matrix(0.0, 0.0, yaw), [0.943713, 0.0, 1.84023])
    moved = source.transformed(matrix, "base_link")
    assert moved.frame_id == "base_link" and moved.boxes.dtype == np.float64
    corners, expected_corners = moved.corners_lidar(), source.corners_lidar()
    for box_index in range(len(source)):
        for corner_index in range(8):
            point = np.append(expected_corners[box_index, corner_index], 1.0)
            np.testing.assert_allclose(corners[box_index, corner_index], (matrix @ point)[:3], atol=1e-8)
    turned = np.angle(np.exp(1j * (moved.headings() - source.headings() - yaw)))
    np.testing.assert_allclose(turned, 0.0, atol=1e-6)
    c, s = math.cos(yaw), math.sin(yaw)
    vx, vy = source.boxes[:, 7].astype(np.float64), source.boxes[:, 8].astype(np.float64)
    np.testing.assert_allclose(moved.boxes[:, 7], c * vx - s * vy, atol=1e-9)
    np.testing.assert_allclose(moved.boxes[:, 8], s * vx + c * vy, atol=1e-9)
    np.testing.assert_array_equal(moved.boxes[:, [3, 4, 5, 9, 10]], source.boxes[:, [3, 4, 5, 9, 10]])
    assert (moved.stamp_ns, moved.cameras_used, moved.warnings) == (source.stamp_ns, source.cameras_used,
                                                                     source.warnings)


def test_a_tilted_transform_keeps_boxes_upright_along_their_projected_forward_axis():
    """Roll and pitch: the centre is moved exactly; the heading is the direction of the rotated
    forward axis (cos psi, sin psi, 0) in the target's xy plane, the velocity the xy part of the
    rotated (vx, vy, 0)."""
    source = random_detections(5, 30)
    rotation = rotation_matrix(0.05, -0.08, 0.7)
    matrix = rigid(rotation, [10.0, -4.0, 0.5])
    moved = source.transformed(matrix, "map")
    for row, moved_row, psi in zip(source.boxes.astype(np.float64), moved.boxes, source.headings()):
        np.testing.assert_allclose(moved_row[:3], rotation @ row[:3] + [10.0, -4.0, 0.5], atol=1e-9)
        forward = rotation @ [math.cos(psi), math.sin(psi), 0.0]
        velocity = rotation @ [row[7], row[8], 0.0]
        np.testing.assert_allclose(moved_row[7:9], velocity[:2], atol=1e-9)
        (heading,) = detections(box(yaw=moved_row[6])).headings()
        assert abs(np.angle(np.exp(1j * (heading - math.atan2(forward[1], forward[0]))))) < 1e-6


def test_map_coordinates_far_from_the_origin_keep_centimetres():
    """A map origin 600 km away (UTM-like): float32 boxes would keep 6 cm steps."""
    source = detections(box(x=1.013, y=-2.021, z=0.25))
    moved = source.transformed(rigid(np.eye(3), [612_345.0, 5_432_109.0, 12.0]), "map")
    np.testing.assert_allclose(moved.boxes[0, :3], [612_346.013, 5_432_106.979, 12.25], atol=1e-5)


def test_transform_must_be_four_by_four():
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        random_detections(1, 2).transformed(np.eye(3), "map")
