"""BEVFusionPipeline with distorted cameras (CPU, the trained tiny-synthetic model on a generated
scene): a frame whose cameras see the scene through lenses gives the boxes of its undistorted
twin within tolerance (:mod:`twin_boxes`), and the remap tables are built once per calibration
change."""
from __future__ import annotations

import numpy as np
import pytest
from twin_boxes import MODEL, assert_twin_boxes, scene_twins, twin_errors, within_twin_tolerance

from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.frame import Frame
from bevfusion_ros.pipeline import BEVFusionPipeline, prepare_points
from bevfusion_ros.tools.parity import stage_chain


@pytest.fixture(scope="module")
def pipeline() -> BEVFusionPipeline:
    return BEVFusionPipeline.from_model_dir(MODEL, backend="cpu")


@pytest.fixture(scope="module")
def twins(pipeline) -> tuple[Frame, Frame]:
    return scene_twins(pipeline.config.image)


def test_a_distorted_frame_gives_the_boxes_of_its_undistorted_twin(pipeline, twins):
    frame, distorted = twins
    twin = pipeline.forward(frame).boxes
    assert_twin_boxes(pipeline.forward(distorted).boxes, twin)
    # The tolerance tells undistortion from none: the raw images taken as undistorted fail it.
    raw_as_undistorted = Frame(distorted.images, frame.points, frame.calibration)
    assert not within_twin_tolerance(twin_errors(pipeline.forward(raw_as_undistorted).boxes, twin))


def test_remap_tables_are_built_once_per_calibration_change(pipeline, twins):
    frame, distorted = twins
    pipeline.update(distorted.calibration)
    tables = pipeline.remap_tables
    assert tables is not None and list(tables.map_index) == [0, -1, 1, 2, 3, -1]
    detections = pipeline.forward(distorted)
    assert "camera_geometry" not in detections.stage_ms and pipeline.remap_tables is tables
    calibration = distorted.calibration
    moved = calibration.camera2lidar.copy()
    moved[:, 2, 3] += 0.01                        # extrinsics alone: new geometry, same tables
    remounted = Calibration.from_camera2lidar(calibration.camera_intrinsics[:, :3, :3], moved,
                                              pipeline.config.image, calibration.camera_names, calibration.distortions)
    stages = pipeline.forward(Frame(distorted.images, distorted.points, remounted)).stage_ms
    assert "camera_geometry" in stages and pipeline.remap_tables is tables
    pipeline.forward(frame)                       # no distortion: no tables
    assert pipeline.remap_tables is None
    pipeline.forward(distorted)
    assert pipeline.remap_tables is not None and pipeline.remap_tables is not tables
    np.testing.assert_array_equal(pipeline.remap_tables.maps, tables.maps)


def test_a_missing_distorted_camera_is_black_as_before(pipeline, twins):
    frame, distorted = twins
    used = [name for name in pipeline.config.camera_names if name != "FRONT"]
    without_front = pipeline.forward(distorted, cameras_used=used)
    assert without_front.cameras_used == tuple(used)
    assert_twin_boxes(without_front.boxes, pipeline.forward(frame, cameras_used=used).boxes)


def test_the_parity_chain_undistorts_as_forward_does(pipeline, twins):
    _, distorted = twins
    pipeline.update(distorted.calibration)
    points = prepare_points(distorted.points, pipeline.config).points
    chain = stage_chain(pipeline, np.stack(distorted.images), points, np)
    np.testing.assert_array_equal(chain["boxes"], pipeline.forward(distorted).boxes.astype(np.float64))
