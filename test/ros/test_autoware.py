"""The vendored autoware_perception_msgs (fields, constants, type hashes) and the boxes written as
DetectedObjects (bevfusion_ros.ros.autoware), without processes.

The serialized bytes, read back by rclpy, must give exactly a message built field by field from
float64 formulas written here (the heading's quaternion, the velocity rotated into the object's
frame), and be as long as rclpy's serialization of it: the CDR writer and the conversion are
both checked against references that do not share their code.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from rclpy.serialization import serialize_message
from std_msgs.msg import Header

from bevfusion_ros.config import NUSCENES_CLASS_NAMES, ConfigError
from bevfusion_ros.detections import Detections
from bevfusion_ros.ros import autoware

apm = pytest.importorskip("autoware_perception_msgs.msg")

#: RIHS01 hashes of the types as rosidl computes them from msg/vendor/autoware_perception_msgs
#: (printed by :func:`test_type_hashes_are_the_recorded_ones`). Recorded from this package's
#: build; no upstream Autoware build was reachable here to read its values from, so they
#: guard against a change of the definitions, and the field lists below hold them to upstream.
RECORDED_HASHES = {
    "DetectedObjects": "2facd6b15786cbd1f720cdd23d22e6d60d2e7e83b8dff8fd401330e24edb187b",
    "DetectedObject": "395e8cae03c45c86ddb3263f9db58f5a1364bdabdcec56c24c817a372f7d566f",
    "DetectedObjectKinematics": "a01b4e06aa855e7a501b1af1e7c6a9eddb70e728e8f1195372ff5801cae1c9eb",
    "ObjectClassification": "38131fef2df46486c20c12c238faf778328309f4c3e9daa6ffd621732e48dd19",
    "Shape": "1a32ac3073c17e4822d39b7f4c263eb1c4a2bacbf707d6db96e77e867063562b",
}
#: Upstream's fields, in order, with their types (autoware_msgs 1.x autoware_perception_msgs).
UPSTREAM_FIELDS = {
    "DetectedObjects": {"header": "std_msgs/Header",
                        "objects": "sequence<autoware_perception_msgs/DetectedObject>"},
    "DetectedObject": {"existence_probability": "float",
                       "classification": "sequence<autoware_perception_msgs/ObjectClassification>",
                       "kinematics": "autoware_perception_msgs/DetectedObjectKinematics",
                       "shape": "autoware_perception_msgs/Shape"},
    "DetectedObjectKinematics": {"pose_with_covariance": "geometry_msgs/PoseWithCovariance",
                                 "has_position_covariance": "boolean", "orientation_availability": "uint8",
                                 "twist_with_covariance": "geometry_msgs/TwistWithCovariance",
                                 "has_twist": "boolean", "has_twist_covariance": "boolean"},
    "ObjectClassification": {"label": "uint8", "probability": "float"},
    "Shape": {"type": "uint8", "footprint": "geometry_msgs/Polygon", "dimensions": "geometry_msgs/Vector3"},
}
UPSTREAM_CONSTANTS = {
    "ObjectClassification": {"UNKNOWN": 0, "CAR": 1, "TRUCK": 2, "BUS": 3, "TRAILER": 4, "MOTORCYCLE": 5,
                             "BICYCLE": 6, "PEDESTRIAN": 7},
    "Shape": {"BOUNDING_BOX": 0, "CYLINDER": 1, "POLYGON": 2},
    "DetectedObjectKinematics": {"UNAVAILABLE": 0, "SIGN_UNKNOWN": 1, "AVAILABLE": 2},
}


@pytest.mark.parametrize("name", sorted(UPSTREAM_FIELDS))
def test_fields_are_upstreams_in_order(name):
    fields = getattr(apm, name).get_fields_and_field_types()
    assert list(fields.items()) == list(UPSTREAM_FIELDS[name].items())


@pytest.mark.parametrize("name", sorted(UPSTREAM_CONSTANTS))
def test_constants_are_upstreams(name):
    message = getattr(apm, name)
    assert {key: getattr(message, key) for key in UPSTREAM_CONSTANTS[name]} == UPSTREAM_CONSTANTS[name]


def test_type_hashes_are_the_recorded_ones(rclpy_context):
    """The hash each type's compiled type support advertises on the graph (what other nodes
    match against), read back through a publisher of this process."""
    import rclpy

    node = rclpy.create_node("autoware_hash_check", context=rclpy_context)
    try:
        hashes = {}
        for name in RECORDED_HASHES:
            topic = f"/hash_check/{name.lower()}"
            node.create_publisher(getattr(apm, name), topic, 1)
            (info,) = node.get_publishers_info_by_topic(topic)
            assert info.topic_type == f"autoware_perception_msgs/msg/{name}"
            assert info.topic_type_hash.version == 1
            hashes[name] = info.topic_type_hash.value.hex()
            print(f"autoware_perception_msgs/msg/{name}: RIHS01_{hashes[name]}")
    finally:
        node.destroy_node()
    assert hashes == RECORDED_HASHES


def test_labels_follow_autoware_and_unknown_names_are_unknown():
    c = apm.ObjectClassification
    expected = {"car": c.CAR, "truck": c.TRUCK, "construction_vehicle": c.TRUCK, "bus": c.BUS,
                "trailer": c.TRAILER, "barrier": c.UNKNOWN, "motorcycle": c.MOTORCYCLE, "bicycle": c.BICYCLE,
                "pedestrian": c.PEDESTRIAN, "traffic_cone": c.UNKNOWN}
    assert autoware.autoware_labels(NUSCENES_CLASS_NAMES) == [expected[name] for name in NUSCENES_CLASS_NAMES]
    assert autoware.autoware_labels(("lorry", "car", "Car")) == [c.UNKNOWN, c.CAR, c.UNKNOWN]
    assert autoware.ORIENTATION_AVAILABILITY == apm.DetectedObjectKinematics.SIGN_UNKNOWN
    assert autoware.BOUNDING_BOX == apm.Shape.BOUNDING_BOX


def random_detections(count: int, seed: int, class_names=NUSCENES_CLASS_NAMES) -> Detections:
    rng = np.random.default_rng(seed)
    boxes = np.zeros((count, 11), dtype=np.float32)
    boxes[:, 0:3] = rng.uniform(-50, 50, (count, 3))
    boxes[:, 3:6] = rng.uniform(0.3, 12, (count, 3))
    boxes[:, 6] = rng.uniform(-4, 4, count)
    boxes[:, 7:9] = rng.normal(0, 6, (count, 2))
    boxes[:, 9] = rng.integers(0, len(class_names), count)
    boxes[:, 10] = np.sort(rng.uniform(0, 1, count))[::-1]
    return Detections(boxes, tuple(class_names))


def reference_objects(detections: Detections, header: Header):
    """DetectedObjects built field by field from float64 formulas: heading psi = -yaw - pi/2,
    quaternion (0, 0, sin psi/2, cos psi/2), twist = (vx, vy) rotated by -psi."""
    message = apm.DetectedObjects(header=header)
    names = {"car": 1, "truck": 2, "construction_vehicle": 2, "bus": 3, "trailer": 4,
             "motorcycle": 5, "bicycle": 6, "pedestrian": 7}
    for x, y, z, w, length, h, yaw, vx, vy, label, score in detections.boxes.astype(np.float64).tolist():
        psi = -yaw - math.pi / 2
        obj = apm.DetectedObject(existence_probability=score)
        obj.classification = [apm.ObjectClassification(
            label=names.get(detections.class_names[int(label)], 0), probability=score)]
        kinematics = obj.kinematics
        kinematics.pose_with_covariance.pose = Pose(
            position=Point(x=x, y=y, z=z),
            orientation=Quaternion(x=0.0, y=0.0, z=math.sin(psi / 2), w=math.cos(psi / 2)))
        kinematics.orientation_availability = 1
        kinematics.has_twist = True
        kinematics.twist_with_covariance.twist.linear = Vector3(
            x=math.cos(psi) * vx + math.sin(psi) * vy, y=-math.sin(psi) * vx + math.cos(psi) * vy, z=0.0)
        obj.shape.type = 0
        obj.shape.dimensions = Vector3(x=length, y=w, z=h)
        message.objects.append(obj)
    return message


@pytest.mark.parametrize("count,frame_id", [(0, "lidar_top"), (1, "a"), (37, "base_link"), (200, "map_12")])
def test_serialized_objects_equal_a_field_by_field_float64_reference(count, frame_id):
    """Frame ids of several lengths move the alignment of every following field."""
    detections = random_detections(count, seed=count)
    header = Header(stamp=Time(sec=1_700_000_123, nanosec=456_789), frame_id=frame_id)
    raw = autoware.serialize_detected_objects(detections, header)
    reference = reference_objects(detections, header)
    message = autoware.detections_to_objects(detections, header)
    assert len(message.objects) == count
    for obj, expected in zip(message.objects, reference.objects):
        pose, expected_pose = obj.kinematics.pose_with_covariance.pose, expected.kinematics.pose_with_covariance.pose
        q, e = pose.orientation, expected_pose.orientation
        # The quaternion of psi and of psi wrapped to (-pi, pi] may differ in sign: same rotation.
        sign = 1.0 if q.w * e.w + q.z * e.z >= 0 else -1.0
        np.testing.assert_allclose([q.x, q.y, sign * q.z, sign * q.w], [e.x, e.y, e.z, e.w], atol=1e-12)
        twist, expected_twist = (o.kinematics.twist_with_covariance.twist.linear for o in (obj, expected))
        np.testing.assert_allclose([twist.x, twist.y, twist.z], [expected_twist.x, expected_twist.y, 0.0],
                                   rtol=1e-12, atol=1e-12)
        expected_pose.orientation = pose.orientation         # now equal up to rounding: compare the rest
        expected.kinematics.twist_with_covariance.twist.linear = twist
    # rclpy reads our bytes into exactly the reference (its own serialization leaves the padding
    # bytes uninitialised, so the bytes themselves are compared by length only).
    assert message == reference
    assert len(raw) == len(serialize_message(reference))


def test_object_frame_velocity_is_the_box_velocity_seen_from_the_box():
    """A box heading along +y (psi = pi/2) that moves along +y goes forward (+x), one moving
    along -x goes to its left (+y); and rotating any twist back by psi gives (vx, vy) again."""
    yaw_of = {math.pi / 2: -math.pi, 0.0: -math.pi / 2}            # psi -> CUDA yaw (psi = -yaw - pi/2)
    boxes = np.array([[0, 0, 0, 1, 2, 1, yaw_of[math.pi / 2], 0.0, 5.0, 0, 0.9],
                      [0, 0, 0, 1, 2, 1, yaw_of[math.pi / 2], -3.0, 0.0, 0, 0.8],
                      [0, 0, 0, 1, 2, 1, yaw_of[0.0], 2.0, -1.0, 0, 0.7]], dtype=np.float32)
    twists = autoware.object_frame_velocities(Detections(boxes, NUSCENES_CLASS_NAMES))
    np.testing.assert_allclose(twists, [[5.0, 0.0], [0.0, 3.0], [2.0, -1.0]], atol=1e-6)
    detections = random_detections(50, seed=7)
    psi = detections.headings()
    twists = autoware.object_frame_velocities(detections)
    back = np.stack([np.cos(psi) * twists[:, 0] - np.sin(psi) * twists[:, 1],
                     np.sin(psi) * twists[:, 0] + np.cos(psi) * twists[:, 1]], axis=1)
    np.testing.assert_allclose(back, detections.boxes[:, 7:9].astype(np.float64), atol=1e-9)


def test_a_missing_package_is_a_config_error_that_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "autoware_perception_msgs.msg", None)     # import raises ImportError
    with pytest.raises(ConfigError, match="node.publish_autoware_objects.*scripts/setup.sh"):
        autoware.objects_message_type()
