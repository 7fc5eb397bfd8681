"""Two processes over real Fast DDS: a child publishes known detections and a cloud, this test
process subscribes and checks every field against ros_samples.py and struct-packed bytes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rclpy
import ros_samples as samples
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2, PointField
from vision_msgs.msg import Detection3DArray

from bevfusion_ros.ros import pointcloud2

PUBLISHER = Path(__file__).with_name("publisher_process.py")
#: RIHS01 hash of upstream vision_msgs/msg/Detection3DArray (see test_interfaces.py for sources).
DETECTION3DARRAY_HASH = "RIHS01_793f5eab9595ac1c0da07873cc859db42eae51f0ee76056db8562515d830e018"
DISCOVERY_TIMEOUT_S = 15.0
RECEIVE_TIMEOUT_S = 10.0


def spin_until(executor: SingleThreadedExecutor, done: Callable[[], bool], timeout: float) -> bool:
    """Spins ``executor`` until ``done()`` or ``timeout`` seconds; returns ``done()``."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    return done()


def stop_child(process: subprocess.Popen) -> str:
    """Signals the child to stop (communicate() closes its stdin), kills it if it lingers;
    returns its output."""
    try:
        output, _ = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output.decode(errors="replace")


def assert_header(header) -> None:
    """The header published by the child."""
    assert header.frame_id == samples.FRAME_ID
    assert (header.stamp.sec, header.stamp.nanosec) == (samples.STAMP_SEC, samples.STAMP_NANOSEC)


def assert_detections(msg: Detection3DArray) -> None:
    """Every field of the received Detection3DArray equals ros_samples.DETECTIONS."""
    assert_header(msg.header)
    assert len(msg.detections) == len(samples.DETECTIONS)
    for det, (class_id, score, center, quat, size, cov_seed, det_id) in zip(msg.detections, samples.DETECTIONS):
        assert_header(det.header)
        assert det.id == det_id
        assert len(det.results) == 1
        result = det.results[0]
        assert (result.hypothesis.class_id, result.hypothesis.score) == (class_id, score)
        for pose in (result.pose.pose, det.bbox.center):
            assert (pose.position.x, pose.position.y, pose.position.z) == center
            o = pose.orientation
            assert (o.x, o.y, o.z, o.w) == quat
        assert list(result.pose.covariance) == samples.covariance(cov_seed)
        assert (det.bbox.size.x, det.bbox.size.y, det.bbox.size.z) == size


def assert_cloud(msg: PointCloud2) -> None:
    """The received cloud's layout and bytes equal the struct-packed reference."""
    assert_header(msg.header)
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        (name, 4 * i, PointField.FLOAT32, 1) for i, name in enumerate(samples.CLOUD_FIELDS)
    ]
    assert (msg.height, msg.width) == (1, samples.CLOUD_POINTS)
    assert (msg.point_step, msg.row_step) == (20, 20 * samples.CLOUD_POINTS)
    assert msg.is_bigendian is False and msg.is_dense is False
    assert msg.data.tobytes() == samples.cloud_reference_bytes()
    points = pointcloud2.read_points(msg)
    expected = np.array([samples.cloud_point(i) for i in range(samples.CLOUD_POINTS)], dtype=np.float32)
    np.testing.assert_array_equal(np.stack([points[n] for n in samples.CLOUD_FIELDS], axis=1), expected)


@pytest.mark.skipif(sys.byteorder != "little", reason="reference bytes are little-endian")
def test_detections_and_cloud_between_processes(ros_env, rclpy_context):
    topic_prefix = f"/bevfusion_test_{os.getpid()}_{ros_env.domain_id}"
    det_topic, cloud_topic = f"{topic_prefix}/detections", f"{topic_prefix}/points"
    node = rclpy.create_node("bevfusion_test_subscriber", context=rclpy_context)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    received: dict[str, object] = {}
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    det_sub = node.create_subscription(Detection3DArray, det_topic, lambda m: received.setdefault("det", m), qos)
    cloud_sub = node.create_subscription(PointCloud2, cloud_topic, lambda m: received.setdefault("cloud", m), qos)
    child = subprocess.Popen(
        [sys.executable, str(PUBLISHER), "--detections", det_topic, "--cloud", cloud_topic, "--timeout", "20"],
        env=ros_env.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    output = ""
    try:
        matched = spin_until(
            executor, lambda: det_sub.get_publisher_count() > 0 and cloud_sub.get_publisher_count() > 0,
            DISCOVERY_TIMEOUT_S,
        )
        assert matched, f"publisher not discovered within {DISCOVERY_TIMEOUT_S} s (child alive: {child.poll() is None})"
        got_both = spin_until(executor, lambda: "det" in received and "cloud" in received, RECEIVE_TIMEOUT_S)
        assert got_both, f"received only {sorted(received)} within {RECEIVE_TIMEOUT_S} s"

        # The node name travels separately from the endpoint (ros_discovery_info): wait for it too.
        def publisher_names() -> list[str]:
            return [p.node_name for p in node.get_publishers_info_by_topic(det_topic)]

        spin_until(executor, lambda: publisher_names() == ["bevfusion_test_publisher"], DISCOVERY_TIMEOUT_S)
        assert publisher_names() == ["bevfusion_test_publisher"]
        publishers = node.get_publishers_info_by_topic(det_topic)
        assert str(publishers[0].topic_type_hash) == DETECTION3DARRAY_HASH  # hash announced over DDS
        assert_detections(received["det"])
        assert_cloud(received["cloud"])
    finally:
        output = stop_child(child)
        executor.shutdown()
        node.destroy_node()
    assert child.returncode == 0, f"publisher exited with {child.returncode}:\n{output}"
