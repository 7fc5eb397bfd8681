"""Shared fixtures: the example data in ../shared (tests using it skip when it is absent) and
helpers of tests in several folders."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from bevfusion_ros.io.calibration import Calibration

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "nuscenes-sample"
# BEVFUSION_EXAMPLE_DATA points elsewhere, e.g. on the GPU machine, where ../shared does not travel.
EXAMPLE_DATA = Path(os.environ.get("BEVFUSION_EXAMPLE_DATA", SHARED_DATA / "cuda-bevfusion-example"))


@pytest.fixture(scope="session")
def example_data_dir() -> Path:
    """CUDA-BEVFusion example-data folder; skips when ../shared is not beside the clone."""
    if not EXAMPLE_DATA.is_dir():
        pytest.skip(f"example data not found at {EXAMPLE_DATA} (../shared is absent)")
    return EXAMPLE_DATA


@pytest.fixture(scope="session")
def ring_calibration():
    """``ring_calibration(pipeline)``: six cameras 60 degrees apart around a mast 1.8 m high,
    K with f = 200 px (camera z forward -> lidar x rotated by the camera's yaw; x right, y down)."""
    def build(pipeline):
        intrinsics = np.tile(np.array([[200.0, 0, 128], [0, 200.0, 64], [0, 0, 1]]), (6, 1, 1))
        camera2lidar = np.tile(np.eye(4), (6, 1, 1))
        for camera in range(6):
            yaw = camera * math.pi / 3
            forward = np.array([math.cos(yaw), math.sin(yaw), 0])
            right = np.array([math.sin(yaw), -math.cos(yaw), 0])
            camera2lidar[camera, :3, :3] = np.stack([right, [0, 0, -1], forward], axis=1)
            camera2lidar[camera, :3, 3] = [0.5, 0.0, 1.8]
        return Calibration.from_camera2lidar(intrinsics, camera2lidar, pipeline.image, pipeline.camera_names)

    return build


@pytest.fixture(scope="session")
def loop_decode():
    """``loop_decode(outputs)``: head outputs ``[1, *, K]`` decoded one proposal at a time by
    spec 6.3 with the resnet50 numbers written out; boxes ``[M, 11]`` by descending score."""
    def decode(outputs):
        expected = []
        for p in range(outputs["score"].shape[2]):
            scores = outputs["score"][0, :, p]
            label = int(np.argmax(scores))
            if scores[label] < 0.12:
                continue
            x = outputs["reg"][0, 0, p] * 0.6 - 54
            y = outputs["reg"][0, 1, p] * 0.6 - 54
            w, l, h = np.exp(outputs["dim"][0, :, p])
            z = outputs["height"][0, 0, p] - h / 2
            if not (-61.2 <= x <= 61.2 and -61.2 <= y <= 61.2 and -10 <= z <= 10):
                continue
            yaw = math.atan2(outputs["rot"][0, 0, p], outputs["rot"][0, 1, p])
            expected.append([x, y, z, w, l, h, yaw, *outputs["vel"][0, :, p], label, scores[label]])
        return np.array(sorted(expected, key=lambda row: -row[10]))

    return decode


@pytest.fixture(scope="session")
def assert_matches_reference():
    """``assert_matches_reference(boxes, expected)``: the pipeline's boxes ``[M, 11]`` are the
    reference's (as many, each paired with the box of its label nearest to it) within 1e-3 in
    metres, radians (yaw modulo 2 pi), m/s and score."""
    def check(boxes: np.ndarray, expected: np.ndarray) -> None:
        assert len(boxes) == len(expected) > 0
        order = []
        for box in expected:
            same_label = np.flatnonzero(boxes[:, 9] == box[9])
            order.append(same_label[np.argmin(np.linalg.norm(boxes[same_label, :3] - box[:3], axis=1))])
        assert len(set(order)) == len(order)
        got = boxes[order]
        assert np.abs(got[:, :6] - expected[:, :6]).max() < 1e-3                  # metres
        yaw_error = np.angle(np.exp(1j * (got[:, 6] - expected[:, 6])))
        assert np.abs(yaw_error).max() < 1e-3                                      # radians
        assert np.abs(got[:, 7:9] - expected[:, 7:9]).max() < 1e-3                 # m/s
        assert np.abs(got[:, 10] - expected[:, 10]).max() < 1e-3                   # score

    return check
