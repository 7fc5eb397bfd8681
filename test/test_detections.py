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
