"""Test publisher, run as a second process by test_cross_process.py.

Publishes the known vision_msgs/Detection3DArray and sensor_msgs/PointCloud2 of ros_samples.py
every 100 ms until its standard input is closed (the test's signal), SIGTERM/SIGINT, or
--timeout seconds, then exits by itself. Run it with the environment of
bevfusion_ros.ros.environment.safe_ros_environment (localhost-only DDS, private domain id).

    python publisher_process.py --detections /t/detections --cloud /t/points --timeout 20
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

import rclpy
import ros_samples as samples
from geometry_msgs.msg import Point, Pose, PoseWithCovariance, Quaternion, Vector3
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header
from vision_msgs.msg import (
    BoundingBox3D,
    Detection3D,
    Detection3DArray,
    ObjectHypothesis,
    ObjectHypothesisWithPose,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, if not pip-installed
from bevfusion_ros.ros import pointcloud2  # noqa: E402


def make_header() -> Header:
    """The header shared by both test messages."""
    header = Header(frame_id=samples.FRAME_ID)
    header.stamp.sec = samples.STAMP_SEC
    header.stamp.nanosec = samples.STAMP_NANOSEC
    return header


def make_detections(header: Header) -> Detection3DArray:
    """Detection3DArray holding ros_samples.DETECTIONS."""
    out = Detection3DArray(header=header)
    for class_id, score, center, quat, size, cov_seed, det_id in samples.DETECTIONS:
        pose = Pose(position=Point(x=center[0], y=center[1], z=center[2]),
                    orientation=Quaternion(x=quat[0], y=quat[1], z=quat[2], w=quat[3]))
        hypothesis = ObjectHypothesisWithPose(
            hypothesis=ObjectHypothesis(class_id=class_id, score=score),
            pose=PoseWithCovariance(pose=pose, covariance=samples.covariance(cov_seed)),
        )
        out.detections.append(Detection3D(
            header=header, results=[hypothesis], id=det_id,
            bbox=BoundingBox3D(center=pose, size=Vector3(x=size[0], y=size[1], z=size[2])),
        ))
    return out


def make_cloud(header: Header) -> PointCloud2:
    """PointCloud2 of ros_samples.cloud_point(i), built with bevfusion_ros.ros.pointcloud2."""
    fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
              for i, name in enumerate(samples.CLOUD_FIELDS)]
    points = [samples.cloud_point(i) for i in range(samples.CLOUD_POINTS)]
    return pointcloud2.create_cloud(header, fields, points)


def watch_stdin(stop: threading.Event) -> None:
    """Sets ``stop`` once standard input reaches end of file."""
    while sys.stdin.buffer.read(1):
        pass
    stop.set()


def main() -> int:
    """Publishes until told to stop; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--detections", required=True)
    parser.add_argument("--cloud", required=True)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=watch_stdin, args=(stop,), daemon=True).start()

    context = Context()
    rclpy.init(context=context)
    node = rclpy.create_node("bevfusion_test_publisher", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        det_pub = node.create_publisher(Detection3DArray, args.detections, 10)
        cloud_pub = node.create_publisher(PointCloud2, args.cloud, 10)
        header = make_header()
        detections, cloud = make_detections(header), make_cloud(header)
        deadline = time.monotonic() + args.timeout
        while not stop.is_set() and time.monotonic() < deadline:
            det_pub.publish(detections)
            cloud_pub.publish(cloud)
            executor.spin_once(timeout_sec=0.1)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
