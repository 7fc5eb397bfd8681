"""The node's optional outputs across processes: Autoware's DetectedObjects beside the
Detection3DArray, every output in ``node.output_frame`` through TF (and no output without that
TF), and per-class score thresholds set at start and changed at run time.

References are computed here: the core pipeline on the same frame in this process, float64
formulas for the rigid transform and for the velocity in the object's frame, a brute-force loop
for the thresholds.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from geometry_msgs.msg import Quaternion, Transform, TransformStamped, Vector3
from node_harness import FRAME_TIMEOUT_S, OUTPUTS, NodeUnderTest, assert_same_boxes, publish_and_wait, set_parameter
from rcl_interfaces.msg import ParameterType, ParameterValue
from visualization_msgs.msg import MarkerArray

from bevfusion_ros.detections import Detections
from bevfusion_ros.ros import convert
from bevfusion_ros.ros.frame_messages import LIDAR_FRAME, frame_messages, header

apm = pytest.importorskip("autoware_perception_msgs.msg")

STAMP_NS = 1_700_000_000_000_000_000
PERIOD_NS = 100_000_000
#: base_link_T_lidar of a nuScenes-like roof lidar: turned -90.1 deg about z, 1.84 m up.
MOUNT_YAW = -1.5725
MOUNT_TRANSLATION = (0.943713, 0.0, 1.84023)
#: RIHS01 of autoware_perception_msgs/msg/DetectedObjects (test_autoware.RECORDED_HASHES).
DETECTED_OBJECTS_HASH = "2facd6b15786cbd1f720cdd23d22e6d60d2e7e83b8dff8fd401330e24edb187b"
AUTOWARE_LABEL = {"car": 1, "truck": 2, "construction_vehicle": 2, "bus": 3, "trailer": 4, "motorcycle": 5,
                  "bicycle": 6, "pedestrian": 7, "barrier": 0, "traffic_cone": 0}


def mount_matrix() -> np.ndarray:
    c, s = math.cos(MOUNT_YAW), math.sin(MOUNT_YAW)
    matrix = np.eye(4)
    matrix[:3, :3] = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    matrix[:3, 3] = MOUNT_TRANSLATION
    return matrix


def mount_transform(stamp_ns: int) -> TransformStamped:
    x, y, z = MOUNT_TRANSLATION
    return TransformStamped(header=header(stamp_ns, "base_link"), child_frame_id=LIDAR_FRAME, transform=Transform(
        translation=Vector3(x=x, y=y, z=z),
        rotation=Quaternion(x=0.0, y=0.0, z=math.sin(MOUNT_YAW / 2), w=math.cos(MOUNT_YAW / 2))))


def stamp_of(msg) -> int:
    return convert.stamp_to_ns(msg.header.stamp)


def collect(harness: NodeUnderTest, message_type: type, topic: str, key=stamp_of) -> dict[int, object]:
    """Messages of ``topic`` by ``key`` (the header's stamp), once this process's subscription has
    matched the node's publisher."""
    received: dict[int, object] = {}
    subscription = harness.node.create_subscription(
        message_type, topic, lambda msg: received.setdefault(key(msg), msg), OUTPUTS)
    assert harness.spin_until(lambda: subscription.get_publisher_count() > 0, FRAME_TIMEOUT_S), topic
    return received


def yaw_of(q) -> float:
    return math.atan2(2.0 * (q.w * q.z + q.x * q.y), 1.0 - 2.0 * (q.y * q.y + q.z * q.z))


def test_autoware_objects_equal_the_detections_with_velocities_in_the_object_frame(
        tiny_model_dir, tmp_path, node_example, tiny_core):
    harness = NodeUnderTest(tiny_model_dir, tmp_path, "zero_fill", publish_autoware_objects=True)
    try:
        harness.wait_ready()
        objects = collect(harness, apm.DetectedObjects, "/bevfusion/objects")
        (info,) = harness.node.get_publishers_info_by_topic("/bevfusion/objects")
        assert info.topic_type_hash.value.hex() == DETECTED_OBJECTS_HASH
        publish_and_wait(harness, node_example, STAMP_NS)
        assert harness.spin_until(lambda: STAMP_NS in objects, FRAME_TIMEOUT_S)
        detections, velocities = harness.detections[STAMP_NS], harness.frame_infos[STAMP_NS].velocities
        assert_same_boxes(detections, tiny_core.forward(node_example))
        message = objects[STAMP_NS]
        assert message.header == detections.header
        assert len(message.objects) == len(detections.detections) == len(velocities)
        labels = set()
        for obj, detection, velocity in zip(message.objects, detections.detections, velocities):
            hypothesis, box = detection.results[0].hypothesis, detection.bbox
            assert obj.existence_probability == pytest.approx(hypothesis.score, abs=1e-7)
            (classification,) = obj.classification
            assert classification.label == AUTOWARE_LABEL[hypothesis.class_id]
            assert classification.probability == pytest.approx(hypothesis.score, abs=1e-7)
            kinematics = obj.kinematics
            assert kinematics.pose_with_covariance.pose == box.center
            assert not kinematics.has_position_covariance
            assert kinematics.orientation_availability == apm.DetectedObjectKinematics.SIGN_UNKNOWN
            assert obj.shape.type == apm.Shape.BOUNDING_BOX and obj.shape.dimensions == box.size
            assert len(obj.shape.footprint.points) == 0
            psi = yaw_of(box.center.orientation)
            linear = kinematics.twist_with_covariance.twist.linear
            expected = (math.cos(psi) * velocity.x + math.sin(psi) * velocity.y,
                        -math.sin(psi) * velocity.x + math.cos(psi) * velocity.y)
            np.testing.assert_allclose([linear.x, linear.y, linear.z], [*expected, 0.0], atol=1e-9)
            assert kinematics.has_twist and not kinematics.has_twist_covariance
            labels.add(classification.label)
        assert len(labels) >= 3 and any(v.x or v.y for v in velocities)     # a test with substance
    finally:
        output = harness.close()
    assert "Traceback" not in output, output


def moved_reference(boxes: Detections) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 centres R c + t, headings psi + yaw and velocities R v of ``boxes`` in base_link."""
    matrix = mount_matrix()
    rows = boxes.boxes.astype(np.float64)
    centres = rows[:, :3] @ matrix[:3, :3].T + matrix[:3, 3]
    velocities = np.pad(rows[:, 7:9], ((0, 0), (0, 1))) @ matrix[:3, :3].T
    return centres, boxes.headings() + MOUNT_YAW, velocities


def test_outputs_in_base_link_are_the_lidar_boxes_moved_by_the_tf_and_none_without_it(
        tiny_model_dir, tmp_path, node_example, tiny_core):
    harness = NodeUnderTest(tiny_model_dir, tmp_path, "zero_fill", output_frame="base_link",
                            publish_autoware_objects=True)
    try:
        harness.wait_ready()
        objects = collect(harness, apm.DetectedObjects, "/bevfusion/objects")
        markers = collect(harness, MarkerArray, "/bevfusion/markers", lambda msg: stamp_of(msg.markers[0]))
        harness.publish(node_example, STAMP_NS)                        # no base_link TF yet
        values = harness.wait_settled()
        assert (values["frames_failed"], values["frames_out"]) == ("1", "0")
        assert harness.statuses_mentioning("node.output_frame 'base_link'")
        assert STAMP_NS not in harness.detections and STAMP_NS not in objects

        stamp = STAMP_NS + PERIOD_NS
        messages = frame_messages(node_example, stamp)
        messages.tf_static.transforms.append(mount_transform(stamp))
        harness.publish_messages(messages)
        assert harness.spin_until(lambda: stamp in harness.detections and stamp in harness.frame_infos
                                  and stamp in objects and stamp in markers, FRAME_TIMEOUT_S)
        lidar_boxes = tiny_core.forward(node_example)
        centres, headings, velocities = moved_reference(lidar_boxes)
        detections, info = harness.detections[stamp], harness.frame_infos[stamp]
        assert {msg.header.frame_id for msg in (detections, info, objects[stamp], markers[stamp].markers[0])} \
            == {"base_link"}
        assert len(detections.detections) == len(lidar_boxes) > 0
        for index, detection in enumerate(detections.detections):
            pose = detection.bbox.center
            np.testing.assert_allclose([pose.position.x, pose.position.y, pose.position.z], centres[index], atol=1e-3)
            assert abs(np.angle(np.exp(1j * (yaw_of(pose.orientation) - headings[index])))) < 1e-4
            size = detection.bbox.size
            np.testing.assert_allclose([size.x, size.y, size.z], lidar_boxes.boxes[index, [4, 3, 5]], atol=1e-4)
            velocity = info.velocities[index]
            np.testing.assert_allclose([velocity.x, velocity.y], velocities[index, :2], atol=1e-4)
            assert objects[stamp].objects[index].kinematics.pose_with_covariance.pose == pose
        assert harness.wait_settled()["frames_out"] == "1"
    finally:
        output = harness.close()
    assert "Traceback" not in output, output


def kept_by_loop(boxes: Detections, default: float, per_class: dict[str, float]) -> Detections:
    """The boxes whose score is at least their class's threshold (else ``default``), one by one."""
    rows = [row for row in boxes.boxes
            if float(row[10]) >= per_class.get(boxes.class_names[int(row[9])], default)]
    return dataclasses.replace(boxes, boxes=np.array(rows, dtype=np.float32).reshape(-1, 11))


def assert_unambiguous(boxes: Detections, thresholds) -> None:
    """No score lies within 1e-6 of a threshold (float32 vs float64 cannot decide the test)."""
    scores = boxes.boxes[:, 10].astype(np.float64)
    assert np.min(np.abs(scores[:, None] - np.asarray(thresholds, dtype=np.float64)[None])) > 1e-6


def string_array(*entries: str) -> ParameterValue:
    return ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY, string_array_value=list(entries))


def test_class_thresholds_from_the_start_and_changed_at_run_time(tiny_model_dir, tmp_path, node_example, tiny_core):
    harness = NodeUnderTest(tiny_model_dir, tmp_path, "zero_fill",
                            class_score_thresholds=["trailer:0.15", "barrier:0.1"])
    try:
        harness.wait_ready()
        tiny_core.set_score_threshold(0.0)
        everything = tiny_core.forward(node_example)
        assert harness.config.head.score_threshold == 0.0            # the model's default: every box
        first = kept_by_loop(everything, 0.0, {"trailer": 0.15, "barrier": 0.1})
        assert_unambiguous(everything, [0.15, 0.1])
        assert 0 < len(first) < len(everything)
        publish_and_wait(harness, node_example, STAMP_NS)
        assert_same_boxes(harness.detections[STAMP_NS], first)

        per_class = {"bicycle": 0.05, "motorcycle": 0.2}
        assert set_parameter(harness, "head.score_threshold", ParameterValue(
            type=ParameterType.PARAMETER_DOUBLE, double_value=0.12)).successful
        assert set_parameter(harness, "node.class_score_thresholds",
                             string_array("bicycle:0.05", "  motorcycle : 0.2", "")).successful
        refused = set_parameter(harness, "node.class_score_thresholds", string_array("lorry:0.5"))
        assert not refused.successful and "node.class_score_thresholds: unknown class 'lorry'" in refused.reason
        second = kept_by_loop(everything, 0.12, per_class)
        assert_unambiguous(everything, [0.12, 0.05, 0.2])
        bicycle = everything.class_names.index("bicycle")
        below_default = (second.boxes[:, 9] == bicycle) & (second.boxes[:, 10] < 0.12)
        assert below_default.any() and 0 < len(second) < len(everything)
        stamp = STAMP_NS + PERIOD_NS
        publish_and_wait(harness, node_example, stamp)
        assert_same_boxes(harness.detections[stamp], second)
        assert harness.wait_settled()["frames_failed"] == "0"
    finally:
        output = harness.close()
    assert "Traceback" not in output, output
