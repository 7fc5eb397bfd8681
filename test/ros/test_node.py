"""bevfusion_node in its own process over real Fast DDS: this test process publishes the shared
example frame (6 Images + CameraInfo + /tf_static + PointCloud2) and checks what the node
publishes against the core pipeline run here on the same frame (tiny preset, CPU backend).

Node processes are shared by the tests of this module (starting one costs seconds): one with
``missing_camera: zero_fill``, one with ``lidar_only``.
"""
from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import yaml
from diagnostic_msgs.msg import DiagnosticStatus
from node_harness import FRAME_TIMEOUT_S, REPO_ROOT, NodeUnderTest, assert_same_boxes, frame_header
from node_harness import publish_and_wait as publish_at
from sensor_msgs.msg import PointCloud2
from tf2_msgs.msg import TFMessage

from bevfusion_ros.io.frame import Frame, load_example_data
from bevfusion_ros.model.presets import TINY
from bevfusion_ros.ros import convert
from bevfusion_ros.ros.frame_messages import cloud_message, frame_messages

BASE_STAMP_NS = 1_700_000_000_000_000_000
PERIOD_NS = 100_000_000
_stamps = itertools.count(1)


def next_stamp_ns() -> int:
    """Increasing stamps, 100 ms apart, shared by every frame this module publishes."""
    return BASE_STAMP_NS + next(_stamps) * PERIOD_NS


@pytest.fixture(scope="module")
def zero_fill_node(tiny_model_dir, tmp_path_factory):
    harness = NodeUnderTest(tiny_model_dir, tmp_path_factory.mktemp("zero_fill"), "zero_fill")
    harness.wait_ready()
    yield harness
    output = harness.close()
    assert "Traceback" not in output, output


def publish_and_wait(harness: NodeUnderTest, frame: Frame, **options) -> int:
    return publish_at(harness, frame, next_stamp_ns(), **options)


def warned_missing(harness: NodeUnderTest, camera: str) -> bool:
    """A WARN diagnostic names ``camera`` as missing."""
    return any(s.level == DiagnosticStatus.WARN and camera in s.message for s in harness.diagnostics)


def test_node_detections_equal_the_core_pipeline(zero_fill_node, node_example, tiny_core):
    stamp = publish_and_wait(zero_fill_node, node_example)
    msg = zero_fill_node.detections[stamp]
    assert msg.header.frame_id == "lidar_top" and convert.stamp_to_ns(msg.header.stamp) == stamp
    expected = tiny_core.forward(node_example)
    assert_same_boxes(msg, expected)
    info = zero_fill_node.frame_infos[stamp]
    assert tuple(info.cameras_used) == zero_fill_node.cameras and list(info.cameras_missing) == []
    assert len(info.velocities) == len(msg.detections)
    np.testing.assert_allclose([[v.x, v.y] for v in info.velocities], expected.boxes[:, 7:9], atol=1e-3)


def test_missing_camera_zero_fill(zero_fill_node, node_example, tiny_core):
    missing = zero_fill_node.cameras[2]
    stamp = publish_and_wait(zero_fill_node, node_example, skip=(missing,))
    info = zero_fill_node.frame_infos[stamp]
    assert list(info.cameras_missing) == [missing] and missing not in info.cameras_used
    used = tuple(name for name in zero_fill_node.cameras if name != missing)
    assert_same_boxes(zero_fill_node.detections[stamp], tiny_core.forward(node_example, used))
    assert zero_fill_node.spin_until(lambda: warned_missing(zero_fill_node, missing), 5.0)


def test_missing_camera_lidar_only(tiny_model_dir, tmp_path, node_example, tiny_core):
    harness = NodeUnderTest(tiny_model_dir, tmp_path, "lidar_only")
    try:
        harness.wait_ready()
        missing = harness.cameras[4]
        stamp = publish_and_wait(harness, node_example, skip=(missing,))
        info = harness.frame_infos[stamp]
        assert list(info.cameras_used) == [] and missing in info.cameras_missing
        assert_same_boxes(harness.detections[stamp], tiny_core.forward(node_example, ()))
        assert harness.spin_until(lambda: warned_missing(harness, missing), 5.0)
    finally:
        output = harness.close()
    assert "Traceback" not in output, output


def test_bad_inputs_give_diagnostics_and_the_next_frame_is_processed(zero_fill_node, node_example, tiny_core):
    node = zero_fill_node
    camera = node.cameras[3]
    small = convert.rgb_to_image(np.zeros((450, 800, 3), np.uint8), frame_header(camera))
    stamp = publish_and_wait(node, node_example, images={camera: small})           # wrong size: camera dropped
    assert camera in node.frame_infos[stamp].cameras_missing
    assert node.spin_until(lambda: node.statuses_mentioning("800x450"), 5.0)
    wrong = convert.rgb_to_image(node_example.images[0], frame_header(camera))
    wrong.encoding = "32FC1"
    stamp = publish_and_wait(node, node_example, images={camera: wrong})          # wrong encoding
    assert node.spin_until(lambda: node.statuses_mentioning("32FC1"), 5.0)
    cases = {"lacks field(s) ['z'": cloud_message(node_example.points[:, [0, 1, 3]], 0, names=("x", "y", "intensity")),
             "NaN": nan_cloud(node_example.points)}
    for text, cloud in cases.items():
        stamp = next_stamp_ns()
        cloud.header.stamp = convert.ns_to_stamp(stamp)
        node.publish(node_example, stamp, cloud=cloud)
        assert node.spin_until(lambda: node.statuses_mentioning(text), FRAME_TIMEOUT_S), text
    assert stamp in node.detections or node.spin_until(lambda: stamp in node.detections, FRAME_TIMEOUT_S)
    stamp = next_stamp_ns()
    node.publish(Frame(node_example.images, node_example.points[:0], node_example.calibration), stamp)    # empty cloud
    assert node.spin_until(lambda: stamp in node.detections, FRAME_TIMEOUT_S)
    assert node.spin_until(lambda: node.statuses_mentioning("empty point cloud"), 5.0)
    node.publish(node_example, BASE_STAMP_NS - 3600 * 10**9)                        # an hour back: bag loop
    assert node.spin_until(lambda: node.statuses_mentioning("backwards"), FRAME_TIMEOUT_S)
    stamp = publish_and_wait(node, node_example)                                     # the next good frame
    assert_same_boxes(node.detections[stamp], tiny_core.forward(node_example))
    uncalibrated = frame_messages(node_example, 0).camera_infos[3]
    uncalibrated.k = [0.0] * 9
    node.info_pubs[3].publish(uncalibrated)                                    # invalid CameraInfo
    assert node.spin_until(lambda: node.statuses_mentioning(f"CameraInfo of {camera}"), 5.0)
    stamp = publish_and_wait(node, node_example, camera_infos=False)                # last valid K kept
    assert_same_boxes(node.detections[stamp], tiny_core.forward(node_example))


def nan_cloud(points: np.ndarray) -> PointCloud2:
    noisy = points.copy()
    noisy[::100, 2] = np.nan
    return cloud_message(noisy, 0)


def test_hundred_frames_at_10_hz_are_answered_or_counted(zero_fill_node, node_example):
    """Message-to-detection latency through ROS (printed); every frame answered or dropped.

    The counters come from settled diagnostics (every cloud published so far accounted for), so
    the starting count cannot be a stale one (the defect: the last diagnostic, read without
    waiting, missed the previous test's last frame one time in a few)."""
    node = zero_fill_node
    before = node.wait_settled()
    stamps = []
    start = time.monotonic()
    for index in range(100):
        stamp = next_stamp_ns()
        stamps.append(stamp)
        published_ns = time.time_ns()
        node.publish(node_example, stamp)
        node.receive_ns.setdefault(-stamp, published_ns)
        while time.monotonic() < start + (index + 1) * 0.1:
            node.executor.spin_once(timeout_sec=0.01)
    after = node.wait_settled(120.0)
    frames = {key: int(after[f"frames_{key}"]) - int(before[f"frames_{key}"])
              for key in ("in", "out", "dropped", "failed")}
    assert frames["in"] == 100 and frames["failed"] == 0
    assert frames["out"] + frames["dropped"] == 100 and frames["out"] > 0
    assert int(after["dropped.queue_full"]) - int(before["dropped.queue_full"]) == frames["dropped"]
    assert node.spin_until(lambda: sum(stamp in node.detections for stamp in stamps) >= frames["out"], 10.0), \
        (frames, sum(stamp in node.detections for stamp in stamps))
    assert sum(stamp in node.detections for stamp in stamps) == frames["out"]
    answered = [stamp for stamp in stamps if stamp in node.detections]
    latencies = np.array([(node.receive_ns[s] - node.receive_ns[-s]) / 1e6 for s in answered])
    print(f"\n[ros latency] tiny/cpu, 100 frames at 10 Hz: {len(answered)} answered, {frames['dropped']} "
          f"dropped; message-to-detection median {np.median(latencies):.1f} ms, "
          f"p99 {np.percentile(latencies, 99):.1f} ms")


def test_past_sweeps_are_motion_compensated_with_tf_odometry(tiny_model_dir, tmp_path, node_example, tiny_core):
    """num_sweeps 3: the node moves the two previous sweeps into the current lidar frame with the
    odom -> lidar_top poses it received on /tf, and gives them their time lag."""
    from geometry_msgs.msg import TransformStamped

    from bevfusion_ros.ros.frame_messages import LIDAR_FRAME, header
    from bevfusion_ros.streaming.sweeps import SweepAccumulator
    harness = NodeUnderTest(tiny_model_dir, tmp_path, "zero_fill", num_sweeps=3, time_lag_field="", world_frame="odom")
    expected_sweeps = SweepAccumulator(3)
    lidar_points = node_example.points[:, :4]
    try:
        harness.wait_ready()
        for index in range(3):
            stamp = next_stamp_ns()
            yaw = 0.02 * index
            pose = np.eye(4)
            pose[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
            pose[:3, 3] = [1.5 * index, 0.2 * index, 0.0]
            transform = convert.matrix_to_transform(pose)
            harness.tf_pub.publish(TFMessage(transforms=[TransformStamped(
                header=header(stamp, "odom"), child_frame_id=LIDAR_FRAME, transform=transform)]))
            harness.wait_acked([harness.tf_pub])
            cloud = cloud_message(lidar_points, stamp, names=("x", "y", "z", "intensity"))
            harness.publish(node_example, stamp, cloud=cloud)
            assert harness.spin_until(lambda: stamp in harness.detections, FRAME_TIMEOUT_S)
            accumulated = expected_sweeps.add(lidar_points, stamp, convert.transform_to_matrix(transform))
        assert len(accumulated) > 2.5 * len(lidar_points)        # close points of past sweeps dropped
        assert np.unique(accumulated[:, 4]).tolist() == pytest.approx([0.0, 0.1, 0.2])
        expected = tiny_core.forward(Frame(node_example.images, accumulated, node_example.calibration))
        assert_same_boxes(harness.detections[stamp], expected)
    finally:
        output = harness.close()
    assert "Traceback" not in output, output


def test_calibration_file_yaml_and_example_folder(tmp_path, example_data_dir):
    from bevfusion_ros.config import ConfigError
    from bevfusion_ros.io.calibration import calibration_from_yaml
    stored = load_example_data(example_data_dir).calibration
    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump({"camera_intrinsics": stored.camera_intrinsics[:, :3, :3].tolist(),
                                    "camera2lidar": stored.camera2lidar.tolist()}))
    loaded = calibration_from_yaml(path, TINY.pipeline)
    np.testing.assert_allclose(loaded.lidar2image, stored.lidar2image, rtol=1e-4, atol=1e-3)
    assert loaded.camera_names == TINY.pipeline.camera_names
    path.write_text("camera_intrinsics: [[1, 0]]\n")
    with pytest.raises(ConfigError, match="calibration file"):
        calibration_from_yaml(path, TINY.pipeline)


def test_launch_file_starts_the_node_with_the_params_file():
    """launch_ros is not on PyPI, so the launch file cannot run here: check what it starts."""
    import ast
    source = (REPO_ROOT / "launch" / "nuscenes.launch.py").read_text()
    calls = {node.func.id: node for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    keywords = {k.arg: k.value for k in calls["Node"].keywords}
    assert ast.literal_eval(keywords["executable"]) == "bevfusion_node"
    assert ast.literal_eval(keywords["package"]) == "bevfusion_ros"
    assert "nuscenes.yaml" in source and "use_sim_time" in source
