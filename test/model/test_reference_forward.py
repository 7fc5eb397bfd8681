"""BEVFusionReference end to end on the real example frame (tiny preset, seeded weights)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bevfusion_ros.io.frame import load_example_data  # noqa: E402
from bevfusion_ros.model.bevfusion import build_model  # noqa: E402
from bevfusion_ros.model.export import calibrate_random_weights  # noqa: E402
from bevfusion_ros.model.head import HeadExport  # noqa: E402
from bevfusion_ros.model.presets import TINY  # noqa: E402
from bevfusion_ros.model.reference import BEVFusionReference, decode_boxes, voxelize  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    model = build_model(TINY, seed=5)
    calibrate_random_weights(model, seed=5)
    return BEVFusionReference(model)


def test_boxes_on_the_example_frame(reference, example_data_dir):
    frame = load_example_data(example_data_dir)
    boxes = reference(frame.images, frame.points, frame.calibration).numpy()
    proposals = TINY.pipeline.head.num_proposals
    assert boxes.shape[1] == 11 and 0 < boxes.shape[0] <= proposals
    assert np.isfinite(boxes).all()
    assert (np.diff(boxes[:, 10]) <= 0).all()                     # sorted by score
    assert set(boxes[:, 9].astype(int)) <= set(range(10))
    assert (np.abs(boxes[:, :2]) <= 61.2).all() and (boxes[:, 3:6] > 0).all()
    again = reference(frame.images, frame.points, frame.calibration).numpy()
    assert np.array_equal(boxes, again)                           # deterministic


def test_branches_compose_into_the_head(reference, example_data_dir):
    frame = load_example_data(example_data_dir)
    points = torch.from_numpy(frame.points)
    camera_bev = reference.camera_bev(frame.images, points, frame.calibration)
    lidar_bev = reference.lidar_bev(points)
    assert camera_bev.shape == (1, TINY.pipeline.camera_geometry.camera_channels, *TINY.bev_size)
    assert lidar_bev.shape == (1, TINY.lidar_bev_channels, *TINY.bev_size)
    assert camera_bev.abs().sum() > 0 and lidar_bev.abs().sum() > 0
    features, coords = voxelize(points, TINY)
    occupied = torch.zeros(TINY.bev_size, dtype=torch.bool)
    occupied[coords[:, 1].long() // 8, coords[:, 2].long() // 8] = True
    assert lidar_bev[0].abs().sum(0)[occupied].gt(0).float().mean() > 0.5   # lidar BEV sits on the points
    with torch.no_grad():
        middle = reference.fuse(camera_bev, lidar_bev)
        boxes = decode_boxes(*HeadExport(reference.model.heads.object)(middle), preset=TINY)
    expected = reference(frame.images, frame.points, frame.calibration)
    assert torch.equal(boxes, expected)


def test_camera_branch_sees_the_images(reference, example_data_dir):
    frame = load_example_data(example_data_dir)
    points = torch.from_numpy(frame.points)
    normal = reference.camera_bev(frame.images, points, frame.calibration)
    dark = reference.camera_bev([image // 4 for image in frame.images], points, frame.calibration)
    assert not torch.allclose(normal, dark)
