"""bevfusion_node with distorted cameras, in its own process over real Fast DDS: this process
publishes the distorted twin of a generated scene (:mod:`twin_boxes`: CameraInfo with
``distortion_model`` and ``d``) and checks the node's boxes against the core pipeline on the same
frame (equal) and against the undistorted twin (within tolerance); a CameraInfo with an
unsupported model leaves its camera out, with the reason, and the node carries on. The edge
conversion (``edge.set_camera_info`` into a FrameAssembler) is also checked without a node.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from node_harness import FRAME_TIMEOUT_S, NodeUnderTest, assert_same_boxes
from node_harness import publish_and_wait as publish_at
from twin_boxes import MODEL, assert_twin_boxes, scene_twins

from bevfusion_ros.config import ImageConfig, load_config
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.frame import Frame
from bevfusion_ros.pipeline import BEVFusionPipeline
from bevfusion_ros.ros import convert, edge
from bevfusion_ros.ros.frame_messages import frame_messages
from bevfusion_ros.streaming.assembler import FrameAssembler, Sweep
from bevfusion_ros.streaming.node_config import NodeConfig

BASE_STAMP_NS = 1_700_000_000_000_000_000
PERIOD_NS = 100_000_000
_stamps = itertools.count(1)
UNSUPPORTED_CAMERA = 2          # FRONT_LEFT: a rational_polynomial lens in the twin


def next_stamp_ns() -> int:
    return BASE_STAMP_NS + next(_stamps) * PERIOD_NS


@pytest.fixture(scope="module")
def core() -> BEVFusionPipeline:
    return BEVFusionPipeline.from_model_dir(MODEL, backend="cpu")


def as_sent(frame: Frame, image: ImageConfig) -> Frame:
    """``frame`` with camera2lidar as a TF transform carries it (a unit quaternion), as the node
    rebuilds its calibration for ``image``."""
    calibration = frame.calibration
    camera2lidar = np.stack([convert.transform_to_matrix(convert.matrix_to_transform(matrix))
                             for matrix in calibration.camera2lidar])
    rebuilt = Calibration.from_camera2lidar(calibration.camera_intrinsics[:, :3, :3], camera2lidar, image,
                                            calibration.camera_names, calibration.distortions)
    return Frame(frame.images, frame.points, rebuilt)


@pytest.fixture(scope="module")
def twins(core) -> tuple[Frame, Frame]:
    frame, distorted = scene_twins(core.config.image)
    return as_sent(frame, core.config.image), as_sent(distorted, core.config.image)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    harness = NodeUnderTest(MODEL, tmp_path_factory.mktemp("undistort"), "zero_fill")
    harness.wait_ready()
    yield harness
    output = harness.close()
    assert "Traceback" not in output, output


def node_boxes(harness: NodeUnderTest, stamp: int, core: BEVFusionPipeline) -> np.ndarray:
    """The node's Detection3DArray of ``stamp`` in the CUDA box layout."""
    return convert.msg_to_detections(harness.detections[stamp], core.config.head.class_names).boxes


def test_camera_info_with_distortion_gives_the_undistorted_twins_boxes(node, twins, core):
    frame, distorted = twins
    stamp = publish_at(node, distorted, next_stamp_ns())
    assert list(node.frame_infos[stamp].cameras_missing) == []
    assert_same_boxes(node.detections[stamp], core.forward(distorted))      # undistorted as the core does
    assert_twin_boxes(node_boxes(node, stamp, core), core.forward(frame).boxes)


def test_an_unsupported_distortion_model_leaves_the_camera_out_and_the_node_carries_on(node, twins, core):
    _, distorted = twins
    names = core.config.camera_names
    stamp = next_stamp_ns()
    messages = frame_messages(distorted, stamp)
    messages.camera_infos[UNSUPPORTED_CAMERA].distortion_model = "kannala_brandt"
    node.publish_messages(messages)
    assert node.spin_until(lambda: stamp in node.detections and stamp in node.frame_infos, FRAME_TIMEOUT_S)
    info = node.frame_infos[stamp]
    assert list(info.cameras_missing) == [names[UNSUPPORTED_CAMERA]]
    assert any("lens distortion cannot be undone: unsupported distortion model 'kannala_brandt'" in warning
               for warning in info.warnings), list(info.warnings)
    assert any(status.level == DiagnosticStatus.WARN for status in node.statuses_mentioning("kannala_brandt"))
    others = [name for name in names if name != names[UNSUPPORTED_CAMERA]]
    assert_same_boxes(node.detections[stamp], core.forward(distorted, cameras_used=others))
    # A usable CameraInfo brings the camera back.
    stamp = publish_at(node, distorted, next_stamp_ns())
    assert list(node.frame_infos[stamp].cameras_missing) == []
    assert_same_boxes(node.detections[stamp], core.forward(distorted))
    values = node.wait_settled()
    assert int(values["frames_failed"]) == 0 and int(values["calibration_errors"]) >= 1


# ---------------------------------------------------------------- the edge, without a node

def assemble_with_infos(twin: Frame, infos: list, undistort: bool = True):
    """The assembled frame of ``twin`` after ``infos`` (CameraInfo messages) went through
    :func:`edge.set_camera_info`; returns (assembled frame, what set_camera_info returned)."""
    settings = NodeConfig(time_lag_field="time_lag", num_sweeps=1, undistort=undistort)
    assembler = FrameAssembler(load_config(MODEL / "bevfusion.yaml"), settings)
    names = assembler.config.camera_names
    problems = [edge.set_camera_info(assembler, name, info) for name, info in zip(names, infos)]
    for index, name in enumerate(names):
        assembler.add_transform("lidar", f"cam_{name}", 0, twin.calibration.camera2lidar[index], True)
        assembler.add_image(name, BASE_STAMP_NS, f"cam_{name}", twin.images[index])
    synced, = assembler.add_cloud(Sweep(BASE_STAMP_NS, "lidar", twin.points, 0.0)).frames
    return assembler.assemble(synced), problems


def test_edge_passes_the_distortion_and_refuses_an_unsupported_model(twins):
    _, distorted = twins
    infos = frame_messages(distorted, BASE_STAMP_NS).camera_infos
    assembled, problems = assemble_with_infos(distorted, infos)
    assert problems == [None] * 6 and assembled.missing == {}
    assert assembled.frame.calibration.distortions == distorted.calibration.distortions
    infos[UNSUPPORTED_CAMERA].distortion_model = "kannala_brandt"
    infos[0].d = [0.1, 0.2]
    assembled, problems = assemble_with_infos(distorted, infos)
    assert "'plumb_bob' takes 4 or 5 coefficients, got 2: the camera is left out" in problems[0]
    assert "unsupported distortion model 'kannala_brandt'" in problems[UNSUPPORTED_CAMERA]
    assert sorted(assembled.missing) == sorted([assembled.frame.calibration.camera_names[index]
                                                for index in (0, UNSUPPORTED_CAMERA)])
    assembled, problems = assemble_with_infos(distorted, infos, undistort=False)    # distortion ignored
    assert problems == [None] * 6 and assembled.missing == {} and assembled.frame.calibration.distortions == ()
