"""A ``bevfusion_node`` child process and this (test) process as its sensor stack: the publishers
of an Image + CameraInfo per camera of the model, /tf_static, /tf and a PointCloud2, and
subscribers to what the node publishes. Shared by the node tests and the fault matrix.

Ordering without sleeps: :meth:`NodeUnderTest.publish` waits until the node's DDS readers have
acknowledged the calibration and the images before it publishes the cloud (the node's executor
then takes them first: their subscriptions were created before the cloud's), so a frame never
loses a camera to arrival order. Counters are read from a *settled* diagnostic
(:meth:`NodeUnderTest.wait_settled`): one whose ``frames_in`` equals the clouds this harness
published and with nothing in progress, so it can never be a stale one.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import rclpy
from bevfusion_ros_msgs.msg import FrameInfo
from conftest import next_domain_id
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterValue, SetParametersResult
from rcl_interfaces.srv import SetParameters
from rclpy.context import Context
from rclpy.duration import Duration
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from tf2_msgs.msg import TFMessage
from vision_msgs.msg import Detection3DArray

from bevfusion_ros.config import load_config, save_config
from bevfusion_ros.io.frame import Frame
from bevfusion_ros.ros import convert
from bevfusion_ros.ros.environment import safe_ros_environment
from bevfusion_ros.ros.frame_messages import FrameMessages, frame_messages
from bevfusion_ros.streaming.node_config import camera_topic

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 60.0
FRAME_TIMEOUT_S = 30.0
ACK_TIMEOUT_S = 10.0
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
#: The node's outputs are kept until this process takes them, even after a busy stretch.
OUTPUTS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def diagnostic_value(status: DiagnosticStatus, key: str) -> str:
    return next(v.value for v in status.values if v.key == key)


def diagnostic_values(status: DiagnosticStatus) -> dict[str, str]:
    return {v.key: v.value for v in status.values}


class NodeUnderTest:
    """A bevfusion_node process plus this process's publishers and subscribers on its domain.

    ``camera_names``: the node's ``camera_names`` parameter (default the model's);
    ``default_topics``: no ``node.camera_topics`` parameter (the node's default, one
    ``/CAM_<name>/image_raw`` per camera), else ``/test/<name>/image``.
    """

    def __init__(self, model_dir: Path, folder: Path, missing_camera: str, managed: bool = False,
                 camera_names: Sequence[str] | None = None, default_topics: bool = False, **node_overrides):
        self.domain_id = next_domain_id()
        self.env = safe_ros_environment(self.domain_id, str(folder / "ros_home"))
        (folder / "ros_home").mkdir(parents=True, exist_ok=True)
        self.env["PYTHONPATH"] = str(REPO_ROOT)
        self.config = load_config(model_dir / "bevfusion.yaml")
        if camera_names is not None:
            self.config = dataclasses.replace(self.config, camera_names=tuple(camera_names))
        self.cameras = self.config.camera_names
        self.camera_topics = [camera_topic(name) if default_topics else f"/test/{name}/image" for name in self.cameras]
        node = {"model_dir": str(model_dir), "backend": "cpu", "lidar_topic": "/test/points",
                **({} if default_topics else {"camera_topics": self.camera_topics}),
                "input_qos": "reliable", "time_lag_field": "time_lag",
                "num_sweeps": 1, "diagnostics_period_s": 0.5,
                "sync": {"slop_s": 0.05, "missing_camera": missing_camera, "wait_timeout_s": 0.2},
                **node_overrides}
        params = folder / "params.yaml"
        save_config(self.config, params, node=node)
        self.process = subprocess.Popen([sys.executable, "-m", "bevfusion_ros.tools.node",
                                         *(["--managed"] if managed else []), "--ros-args",
                                         "--params-file", str(params)], env=self.env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.context = Context()
        rclpy.init(context=self.context, domain_id=self.domain_id)
        self.node = rclpy.create_node("bevfusion_test_driver", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        create = self.node.create_publisher
        self.image_pubs = [create(Image, topic, RELIABLE) for topic in self.camera_topics]
        self.info_pubs = [create(CameraInfo, topic.rsplit("/", 1)[0] + "/camera_info", RELIABLE)
                          for topic in self.camera_topics]
        self.cloud_pub = create(PointCloud2, "/test/points", RELIABLE)
        self.tf_static_pub = create(TFMessage, "/tf_static", LATCHED)
        self.tf_pub = create(TFMessage, "/tf", RELIABLE)
        self.clouds_published = 0
        self._extrinsics: list = []                  # the /tf_static content last sent
        self.detections: dict[int, Detection3DArray] = {}
        self.frame_infos: dict[int, FrameInfo] = {}
        self.diagnostics: list[DiagnosticStatus] = []
        self.receive_ns: dict[int, int] = {}
        subscribe = self.node.create_subscription
        subscribe(Detection3DArray, "/bevfusion/detections", self._on_detections, OUTPUTS)
        subscribe(FrameInfo, "/bevfusion/frame_info",
                  lambda m: self.frame_infos.setdefault(convert.stamp_to_ns(m.header.stamp), m), OUTPUTS)
        subscribe(DiagnosticArray, "/diagnostics", lambda m: self.diagnostics.extend(m.status), OUTPUTS)

    def _on_detections(self, msg: Detection3DArray) -> None:
        stamp = convert.stamp_to_ns(msg.header.stamp)
        self.detections.setdefault(stamp, msg)
        self.receive_ns.setdefault(stamp, time.time_ns())

    def spin_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"node exited with {self.process.returncode}:\n{self.output()}")
            self.executor.spin_once(timeout_sec=0.02)
        return done()

    def wait_ready(self) -> None:
        ready = self.spin_until(lambda: self.cloud_pub.get_subscription_count() > 0
                                and all(p.get_subscription_count() > 0 for p in self.image_pubs)
                                and self.tf_static_pub.get_subscription_count() > 0
                                and self.tf_pub.get_subscription_count() > 0, STARTUP_TIMEOUT_S)
        assert ready, f"node did not subscribe within {STARTUP_TIMEOUT_S} s"

    def wait_acked(self, publishers) -> None:
        """Until the node's readers hold everything these publishers sent."""
        for publisher in publishers:
            assert publisher.wait_for_all_acked(Duration(seconds=ACK_TIMEOUT_S)), publisher.topic_name

    def publish_messages(self, messages: FrameMessages, camera_infos: bool = True) -> None:
        """Calibration and images (a None image is not sent), acknowledged, then the cloud.
        /tf_static (latched) is sent when it changed (its acknowledgement takes seconds)."""
        extrinsics = [(t.child_frame_id, t.transform) for t in messages.tf_static.transforms]
        if extrinsics != self._extrinsics:
            self.tf_static_pub.publish(messages.tf_static)
            self.wait_acked([self.tf_static_pub])
            self._extrinsics = extrinsics
        for info, image, image_pub, info_pub in zip(messages.camera_infos, messages.images,
                                                    self.image_pubs, self.info_pubs):
            if camera_infos:
                info_pub.publish(info)
            if image is not None:
                image_pub.publish(image)
        self.wait_acked([*self.info_pubs, *self.image_pubs])
        self.publish_cloud(messages.cloud)

    def publish_cloud(self, cloud: PointCloud2) -> None:
        self.cloud_pub.publish(cloud)
        self.clouds_published += 1

    def publish(self, frame: Frame, stamp_ns: int, skip: tuple[str, ...] = (), cloud: PointCloud2 | None = None,
                images: dict[str, Image] | None = None, camera_infos: bool = True) -> None:
        """One frame: calibration, the images (except ``skip``; ``images`` replace some), then the cloud."""
        messages = frame_messages(frame, stamp_ns)
        for index, (name, image) in enumerate(zip(self.cameras, messages.images)):
            replacement = (images or {}).get(name)
            if replacement is not None:
                replacement.header = image.header
            messages.images[index] = None if name in skip else (replacement or image)
        if cloud is not None:
            messages.cloud = cloud
        self.publish_messages(messages, camera_infos)

    def call(self, service_type: type, name: str, request: object, timeout: float = STARTUP_TIMEOUT_S) -> object:
        """Call the node's service ``name`` (e.g. ``/bevfusion/change_state``) and return its response."""
        client = self.node.create_client(service_type, name)
        try:
            assert self.spin_until(client.service_is_ready, timeout), f"{name} not available"
            future = client.call_async(request)
            assert self.spin_until(future.done, timeout), f"{name} did not answer within {timeout} s"
            return future.result()
        finally:
            self.node.destroy_client(client)

    def statuses_mentioning(self, text: str) -> list[DiagnosticStatus]:
        return [s for s in self.diagnostics if text in s.message or any(text in v.value for v in s.values)]

    def settled_values(self) -> dict[str, str] | None:
        """The values of the newest diagnostic that accounts for every cloud published, with
        none in progress; None while there is none."""
        for status in reversed(self.diagnostics):
            values = diagnostic_values(status)
            if int(values["frames_in"]) == self.clouds_published:
                return values if int(values["frames_in_progress"]) == 0 else None
        return None

    def wait_settled(self, timeout: float = FRAME_TIMEOUT_S) -> dict[str, str]:
        """:meth:`settled_values`, waited for; its counters add up."""
        assert self.spin_until(lambda: self.settled_values() is not None, timeout), \
            f"not settled after {self.clouds_published} clouds: {self.diagnostics[-1:]}"
        values = self.settled_values()
        assert values is not None
        frames = {key: int(values[f"frames_{key}"]) for key in ("in", "out", "dropped", "failed")}
        assert frames["in"] == frames["out"] + frames["dropped"] + frames["failed"], values
        return values

    def output(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        return out.decode(errors="replace")

    def close(self) -> str:
        output = self.output()
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        return output


def set_parameter(harness: NodeUnderTest, name: str, value: ParameterValue) -> SetParametersResult:
    """``ros2 param set`` of the node's parameter ``name``; the node's answer."""
    request = SetParameters.Request(parameters=[ParameterMsg(name=name, value=value)])
    result, = harness.call(SetParameters, "/bevfusion/set_parameters", request).results
    return result


def publish_and_wait(harness: NodeUnderTest, frame: Frame, stamp: int, **options) -> int:
    harness.publish(frame, stamp, **options)
    assert harness.spin_until(lambda: stamp in harness.detections and stamp in harness.frame_infos,
                              FRAME_TIMEOUT_S), f"no detections for stamp {stamp}"
    return stamp


def assert_same_boxes(msg: Detection3DArray, expected) -> None:
    """The node's Detection3DArray equals the core pipeline's boxes in ROS conventions."""
    boxes = expected.to_rep103()
    assert len(msg.detections) == len(boxes) > 0
    for detection, box in zip(msg.detections, boxes):
        hypothesis = detection.results[0].hypothesis
        pose = detection.bbox.center
        assert hypothesis.class_id == box["label"]
        assert hypothesis.score == pytest.approx(box["score"], abs=1e-4)
        position = [pose.position.x, pose.position.y, pose.position.z]
        np.testing.assert_allclose(position, box["center"], atol=1e-3)
        size = detection.bbox.size
        np.testing.assert_allclose([size.x, size.y, size.z], box["size"], atol=1e-3)
        q = pose.orientation
        yaw = 2 * np.arctan2(q.z, q.w)
        assert abs(np.angle(np.exp(1j * (yaw - box["yaw"])))) < 1e-3
        assert (q.x, q.y) == (0.0, 0.0)


def frame_header(camera: str):
    from bevfusion_ros.ros.frame_messages import CAMERA_FRAME_PREFIX, header
    return header(0, CAMERA_FRAME_PREFIX + camera)
