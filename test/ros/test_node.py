"""bevfusion_node in its own process over real Fast DDS: this test process publishes the shared
example frame (6 Images + CameraInfo + /tf_static + PointCloud2) and checks what the node
publishes against the core pipeline run here on the same frame (tiny preset, CPU backend).

Node processes are shared by the tests of this module (starting one costs seconds): one with
``missing_camera: zero_fill``, one with ``lidar_only``.
"""
from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rclpy
import yaml
from conftest import next_domain_id
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from tf2_msgs.msg import TFMessage
from vision_msgs.msg import Detection3DArray

from bevfusion_ros.config import load_config, save_config
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.frame import Frame, load_example_data
from bevfusion_ros.model.export import export_model_set
from bevfusion_ros.model.presets import TINY
from bevfusion_ros.pipeline import BEVFusionPipeline
from bevfusion_ros.ros import convert
from bevfusion_ros.ros.environment import safe_ros_environment
from bevfusion_ros.ros.frame_messages import cloud_message, frame_messages
from bevfusion_ros_msgs.msg import FrameInfo

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 60.0
FRAME_TIMEOUT_S = 30.0
BASE_STAMP_NS = 1_700_000_000_000_000_000
PERIOD_NS = 100_000_000
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
_stamps = itertools.count(1)


def next_stamp_ns() -> int:
    """Increasing stamps, 100 ms apart, shared by every frame this module publishes."""
    return BASE_STAMP_NS + next(_stamps) * PERIOD_NS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_model_set(TINY, "fp16", tmp_path_factory.mktemp("tiny"), seed=3).out_dir


@pytest.fixture(scope="module")
def example(example_data_dir) -> Frame:
    """The example frame with its calibration rebuilt as the node rebuilds it: K, and camera2lidar
    as a TF transform carries it (a unit quaternion: the stored float32 rotation orthonormalised)."""
    frame = load_example_data(example_data_dir)
    calibration = frame.calibration
    camera2lidar = np.stack([convert.transform_to_matrix(convert.matrix_to_transform(matrix))
                             for matrix in calibration.camera2lidar])
    rebuilt = Calibration.from_camera2lidar(calibration.camera_intrinsics[:, :3, :3], camera2lidar,
                                            TINY.pipeline.image, calibration.camera_names)
    return Frame(frame.images, frame.points, rebuilt)


@pytest.fixture(scope="module")
def core(model_dir) -> BEVFusionPipeline:
    return BEVFusionPipeline.from_model_dir(model_dir)


class NodeUnderTest:
    """A bevfusion_node process plus this process's publishers and subscribers on its domain."""

    def __init__(self, model_dir: Path, folder: Path, missing_camera: str, **node_overrides):
        self.domain_id = next_domain_id()
        self.env = safe_ros_environment(self.domain_id, str(folder / "ros_home"))
        (folder / "ros_home").mkdir(parents=True, exist_ok=True)
        self.env["PYTHONPATH"] = str(REPO_ROOT)
        self.config = load_config(model_dir / "bevfusion.yaml")
        self.cameras = self.config.camera_names
        self.camera_topics = [f"/test/{name}/image" for name in self.cameras]
        node = {"model_dir": str(model_dir), "backend": "cpu", "lidar_topic": "/test/points",
                "camera_topics": self.camera_topics, "input_qos": "reliable", "time_lag_field": "time_lag",
                "num_sweeps": 1, "diagnostics_period_s": 0.5,
                "sync": {"slop_s": 0.05, "missing_camera": missing_camera, "wait_timeout_s": 0.2},
                **node_overrides}
        params = folder / "params.yaml"
        save_config(self.config, params, node=node)
        self.process = subprocess.Popen([sys.executable, "-m", "bevfusion_ros.ros.node", "--ros-args",
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
        self.detections: dict[int, Detection3DArray] = {}
        self.frame_infos: dict[int, FrameInfo] = {}
        self.diagnostics: list[DiagnosticStatus] = []
        self.receive_ns: dict[int, int] = {}
        subscribe = self.node.create_subscription
        subscribe(Detection3DArray, "/bevfusion/detections", self._on_detections, RELIABLE)
        subscribe(FrameInfo, "/bevfusion/frame_info",
                  lambda m: self.frame_infos.setdefault(convert.stamp_to_ns(m.header.stamp), m), RELIABLE)
        subscribe(DiagnosticArray, "/diagnostics", lambda m: self.diagnostics.extend(m.status), RELIABLE)

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
                                and self.tf_static_pub.get_subscription_count() > 0, STARTUP_TIMEOUT_S)
        assert ready, f"node did not subscribe within {STARTUP_TIMEOUT_S} s"

    def publish(self, frame: Frame, stamp_ns: int, skip: tuple[str, ...] = (), cloud: PointCloud2 | None = None,
                images: dict[str, Image] | None = None, camera_infos: bool = True) -> None:
        """One frame: calibration, the images (except ``skip``; ``images`` replace some), then the cloud."""
        messages = frame_messages(frame, stamp_ns)
        self.tf_static_pub.publish(messages.tf_static)
        for name, info, image, image_pub, info_pub in zip(self.cameras, messages.camera_infos, messages.images,
                                                         self.image_pubs, self.info_pubs):
            if camera_infos:
                info_pub.publish(info)
            if name not in skip:
                replacement = (images or {}).get(name)
                if replacement is not None:
                    replacement.header = image.header
                image_pub.publish(replacement or image)
        self.executor.spin_once(timeout_sec=0.05)        # images before the sweep that triggers
        self.cloud_pub.publish(cloud if cloud is not None else messages.cloud)

    def statuses_mentioning(self, text: str) -> list[DiagnosticStatus]:
        return [s for s in self.diagnostics if text in s.message or any(text in v.value for v in s.values)]

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


@pytest.fixture(scope="module")
def zero_fill_node(model_dir, tmp_path_factory):
    harness = NodeUnderTest(model_dir, tmp_path_factory.mktemp("zero_fill"), "zero_fill")
    harness.wait_ready()
    yield harness
    output = harness.close()
    assert "Traceback" not in output, output


def warned_missing(harness: NodeUnderTest, camera: str) -> bool:
    """A WARN diagnostic names ``camera`` as missing."""
    return any(s.level == DiagnosticStatus.WARN and camera in s.message for s in harness.diagnostics)


def publish_and_wait(harness: NodeUnderTest, frame: Frame, **options) -> int:
    stamp = next_stamp_ns()
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


def test_node_detections_equal_the_core_pipeline(zero_fill_node, example, core):
    stamp = publish_and_wait(zero_fill_node, example)
    msg = zero_fill_node.detections[stamp]
    assert msg.header.frame_id == "lidar_top" and convert.stamp_to_ns(msg.header.stamp) == stamp
    expected = core.forward(example)
    assert_same_boxes(msg, expected)
    info = zero_fill_node.frame_infos[stamp]
    assert tuple(info.cameras_used) == zero_fill_node.cameras and list(info.cameras_missing) == []
    assert len(info.velocities) == len(msg.detections)
    np.testing.assert_allclose([[v.x, v.y] for v in info.velocities], expected.boxes[:, 7:9], atol=1e-3)


def test_missing_camera_zero_fill(zero_fill_node, example, core):
    missing = zero_fill_node.cameras[2]
    stamp = publish_and_wait(zero_fill_node, example, skip=(missing,))
    info = zero_fill_node.frame_infos[stamp]
    assert list(info.cameras_missing) == [missing] and missing not in info.cameras_used
    used = tuple(name for name in zero_fill_node.cameras if name != missing)
    assert_same_boxes(zero_fill_node.detections[stamp], core.forward(example, used))
    assert zero_fill_node.spin_until(lambda: warned_missing(zero_fill_node, missing), 5.0)


def test_missing_camera_lidar_only(model_dir, tmp_path, example, core):
    harness = NodeUnderTest(model_dir, tmp_path, "lidar_only")
    try:
        harness.wait_ready()
        missing = harness.cameras[4]
        stamp = publish_and_wait(harness, example, skip=(missing,))
        info = harness.frame_infos[stamp]
        assert list(info.cameras_used) == [] and missing in info.cameras_missing
        assert_same_boxes(harness.detections[stamp], core.forward(example, ()))
        assert harness.spin_until(lambda: warned_missing(harness, missing), 5.0)
    finally:
        output = harness.close()
    assert "Traceback" not in output, output


def test_bad_inputs_give_diagnostics_and_the_next_frame_is_processed(zero_fill_node, example, core):
    node = zero_fill_node
    camera = node.cameras[3]
    small = convert.rgb_to_image(np.zeros((450, 800, 3), np.uint8), frame_header(camera))
    stamp = publish_and_wait(node, example, images={camera: small})           # wrong size: camera dropped
    assert camera in node.frame_infos[stamp].cameras_missing
    assert node.spin_until(lambda: node.statuses_mentioning("800x450"), 5.0)
    wrong = convert.rgb_to_image(example.images[0], frame_header(camera))
    wrong.encoding = "32FC1"
    stamp = publish_and_wait(node, example, images={camera: wrong})          # wrong encoding
    assert node.spin_until(lambda: node.statuses_mentioning("32FC1"), 5.0)
    cases = {"lacks field(s) ['z'": cloud_message(example.points[:, [0, 1, 3]], 0, names=("x", "y", "intensity")),
             "NaN": nan_cloud(example.points)}
    for text, cloud in cases.items():
        stamp = next_stamp_ns()
        cloud.header.stamp = convert.ns_to_stamp(stamp)
        node.publish(example, stamp, cloud=cloud)
        assert node.spin_until(lambda: node.statuses_mentioning(text), FRAME_TIMEOUT_S), text
    assert stamp in node.detections or node.spin_until(lambda: stamp in node.detections, FRAME_TIMEOUT_S)
    stamp = next_stamp_ns()
    node.publish(Frame(example.images, example.points[:0], example.calibration), stamp)    # empty cloud
    assert node.spin_until(lambda: stamp in node.detections, FRAME_TIMEOUT_S)
    assert node.spin_until(lambda: node.statuses_mentioning("empty point cloud"), 5.0)
    node.publish(example, BASE_STAMP_NS)                                        # stamp going backwards
    assert node.spin_until(lambda: node.statuses_mentioning("backwards"), FRAME_TIMEOUT_S)
    stamp = publish_and_wait(node, example)                                     # the next good frame
    assert_same_boxes(node.detections[stamp], core.forward(example))
    uncalibrated = frame_messages(example, 0).camera_infos[3]
    uncalibrated.k = [0.0] * 9
    node.info_pubs[3].publish(uncalibrated)                                    # invalid CameraInfo
    assert node.spin_until(lambda: node.statuses_mentioning(f"CameraInfo of {camera}"), 5.0)
    stamp = publish_and_wait(node, example, camera_infos=False)                # last valid K kept
    assert_same_boxes(node.detections[stamp], core.forward(example))


def frame_header(camera: str):
    from bevfusion_ros.ros.frame_messages import CAMERA_FRAME_PREFIX, header
    return header(0, CAMERA_FRAME_PREFIX + camera)


def nan_cloud(points: np.ndarray) -> PointCloud2:
    noisy = points.copy()
    noisy[::100, 2] = np.nan
    return cloud_message(noisy, 0)


def diagnostic_value(status: DiagnosticStatus, key: str) -> str:
    return next(v.value for v in status.values if v.key == key)


def test_hundred_frames_at_10_hz_are_answered_or_counted(zero_fill_node, example):
    """Message-to-detection latency through ROS (printed); every frame answered or dropped."""
    node = zero_fill_node
    before = node.diagnostics[-1] if node.diagnostics else None
    frames_before = int(diagnostic_value(before, "frames_in")) if before else 0
    stamps = []
    start = time.monotonic()
    for index in range(100):
        stamp = next_stamp_ns()
        stamps.append(stamp)
        published_ns = time.time_ns()
        node.publish(example, stamp)
        node.receive_ns.setdefault(-stamp, published_ns)
        while time.monotonic() < start + (index + 1) * 0.1:
            node.executor.spin_once(timeout_sec=0.01)

    def settled() -> bool:
        last = node.diagnostics[-1] if node.diagnostics else None
        if last is None or int(diagnostic_value(last, "frames_in")) - frames_before < 100:
            return False
        answered = sum(stamp in node.detections for stamp in stamps)
        return answered + int(diagnostic_value(last, "frames_dropped")) >= 100 or \
            int(diagnostic_value(last, "frames_out")) + int(diagnostic_value(last, "frames_dropped")) \
            >= int(diagnostic_value(last, "frames_in"))
    assert node.spin_until(settled, 120.0), node.diagnostics[-1] if node.diagnostics else "no diagnostics"
    last = node.diagnostics[-1]
    answered = [stamp for stamp in stamps if stamp in node.detections]
    dropped = int(diagnostic_value(last, "frames_dropped"))
    assert len(answered) > 0 and int(diagnostic_value(last, "frames_in")) - frames_before == 100
    latencies = np.array([(node.receive_ns[s] - node.receive_ns[-s]) / 1e6 for s in answered])
    print(f"\n[ros latency] tiny/cpu, 100 frames at 10 Hz: {len(answered)} answered, {dropped} dropped "
          f"(node total); message-to-detection median {np.median(latencies):.1f} ms, "
          f"p99 {np.percentile(latencies, 99):.1f} ms")


def test_past_sweeps_are_motion_compensated_with_tf_odometry(model_dir, tmp_path, example, core):
    """num_sweeps 3: the node moves the two previous sweeps into the current lidar frame with the
    odom -> lidar_top poses it received on /tf, and gives them their time lag."""
    from geometry_msgs.msg import TransformStamped

    from bevfusion_ros.ros.frame_messages import LIDAR_FRAME, header
    from bevfusion_ros.sweeps import SweepAccumulator
    harness = NodeUnderTest(model_dir, tmp_path, "zero_fill", num_sweeps=3, time_lag_field="", world_frame="odom")
    expected_sweeps = SweepAccumulator(3)
    lidar_points = example.points[:, :4]
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
            harness.executor.spin_once(timeout_sec=0.05)
            harness.publish(example, stamp, cloud=cloud_message(lidar_points, stamp, names=("x", "y", "z", "intensity")))
            assert harness.spin_until(lambda: stamp in harness.detections, FRAME_TIMEOUT_S)
            accumulated = expected_sweeps.add(lidar_points, stamp, convert.transform_to_matrix(transform))
        assert len(accumulated) > 2.5 * len(lidar_points)        # close points of past sweeps dropped
        assert np.unique(accumulated[:, 4]).tolist() == pytest.approx([0.0, 0.1, 0.2])
        expected = core.forward(Frame(example.images, accumulated, example.calibration))
        assert_same_boxes(harness.detections[stamp], expected)
    finally:
        output = harness.close()
    assert "Traceback" not in output, output


def test_calibration_file_yaml_and_example_folder(tmp_path, example_data_dir):
    from bevfusion_ros.config import ConfigError
    from bevfusion_ros.ros.node import calibration_from_yaml
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
