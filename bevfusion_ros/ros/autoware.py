"""Boxes as ``autoware_perception_msgs/DetectedObjects`` (the node's optional ``~/objects``).

One ``DetectedObject`` per box, in the order of ``Detection3DArray.detections``:

* ``existence_probability`` = score; one ``ObjectClassification``: the Autoware label of the
  box's class (:data:`AUTOWARE_LABELS`; classes Autoware has no label for, and unknown names, are
  ``UNKNOWN``) with probability = score;
* ``kinematics.pose_with_covariance.pose`` = box centre + heading, as in the Detection3DArray
  (:func:`~bevfusion_ros.ros.convert.box_poses`), no covariance (``has_position_covariance``
  false); ``orientation_availability`` = :data:`ORIENTATION_AVAILABILITY`;
* ``kinematics.twist_with_covariance.twist.linear`` = the box velocity in the object's own frame
  (Autoware's convention: x along the heading, y to its left; :func:`object_frame_velocities`),
  ``has_twist`` true, no twist covariance;
* ``shape``: ``BOUNDING_BOX``, ``dimensions`` = (length, width, height) as ``bbox.size``, empty
  footprint.

Written straight to CDR bytes like :func:`~bevfusion_ros.ros.convert.serialize_detections`
(:func:`serialize_detected_objects`); the message form (:func:`detections_to_objects`) is those
bytes read back. Only :func:`objects_message_type` and :func:`detections_to_objects` import
``autoware_perception_msgs``, so the node runs without it while ``~/objects`` is off.
"""
from __future__ import annotations

import struct
from typing import Any

import numpy as np
from std_msgs.msg import Header

from bevfusion_ros.config import ConfigError
from bevfusion_ros.detections import SCORE, VX, VY, Detections, H, L, W
from bevfusion_ros.ros.cdr import CdrWriter, header_bytes
from bevfusion_ros.ros.convert import box_poses

# autoware_perception_msgs/ObjectClassification labels.
UNKNOWN, CAR, TRUCK, BUS, TRAILER, MOTORCYCLE, BICYCLE, PEDESTRIAN = range(8)
#: nuScenes class name -> Autoware label (barrier, traffic_cone: UNKNOWN, Autoware has no label).
AUTOWARE_LABELS: dict[str, int] = {
    "car": CAR, "truck": TRUCK, "construction_vehicle": TRUCK, "bus": BUS, "trailer": TRAILER,
    "motorcycle": MOTORCYCLE, "bicycle": BICYCLE, "pedestrian": PEDESTRIAN,
    "barrier": UNKNOWN, "traffic_cone": UNKNOWN,
}
# DetectedObjectKinematics.orientation_availability values and Shape.type.
SIGN_UNKNOWN, AVAILABLE = 1, 2
BOUNDING_BOX = 0
#: SIGN_UNKNOWN, not AVAILABLE: the head regresses the heading as (sin, cos) over the full turn,
#: but a single frame often cannot tell a vehicle's front from its back (a parked car, a
#: symmetric trailer) and the flipped box scores as high. SIGN_UNKNOWN lets Autoware's tracker
#: settle the sign from the track's motion instead of trusting a possibly flipped one (what
#: Autoware's own CenterPoint detector reports too); the axis itself is reliable.
ORIENTATION_AVAILABILITY = SIGN_UNKNOWN
#: The package's absence, said once: how to get it.
MISSING_PACKAGE = ("node.publish_autoware_objects is true but autoware_perception_msgs cannot be imported "
                   "({error}): install ros-$ROS_DISTRO-autoware-perception-msgs, or run scripts/setup.sh "
                   "(it builds msg/vendor/autoware_perception_msgs)")
_COVARIANCE_ZEROS = bytes(36 * 8)
_POSITION_FLAGS = struct.pack("<?B", False, ORIENTATION_AVAILABILITY)   # has_position_covariance, availability
_TWIST_FLAGS = struct.pack("<??B", True, False, BOUNDING_BOX)            # has_twist, has_twist_covariance, shape.type
_EMPTY_FOOTPRINT = struct.pack("<I", 0)


def autoware_labels(class_names: tuple[str, ...]) -> list[int]:
    """Autoware label per class index (:data:`AUTOWARE_LABELS`, UNKNOWN for other names)."""
    return [AUTOWARE_LABELS.get(name, UNKNOWN) for name in class_names]


def object_frame_velocities(detections: Detections) -> np.ndarray:
    """float64 ``[M, 2]``: each box's velocity (vx, vy of the boxes' frame) expressed in the box's
    own frame, i.e. rotated by minus its REP-103 heading psi:
    ``(cos psi vx + sin psi vy, -sin psi vx + cos psi vy)``."""
    heading = detections.headings()
    cos, sin = np.cos(heading), np.sin(heading)
    vx, vy = (detections.boxes[:, column].astype(np.float64) for column in (VX, VY))
    return np.stack([cos * vx + sin * vy, -sin * vx + cos * vy], axis=1)


def serialize_detected_objects(detections: Detections, header: Header) -> bytes:
    """The DetectedObjects of ``detections`` (module docstring) as CDR bytes, for
    ``Publisher.publish(bytes)``."""
    boxes = detections.boxes.astype(np.float64)
    labels = autoware_labels(detections.class_names)
    twists = np.zeros((len(boxes), 6))                               # linear xyz, angular xyz
    twists[:, :2] = object_frame_velocities(detections)
    writer = CdrWriter()
    writer.put(header_bytes(header), 4)
    writer.uint32(len(boxes))
    for label, score, pose, twist, size in zip(detections.labels.tolist(), boxes[:, SCORE].tolist(),
                                               box_poses(detections), twists, boxes[:, [L, W, H]]):
        # existence_probability, classification: [one (label, 3 bytes padding, probability)]
        writer.put(struct.pack("<fIB3xf", score, 1, labels[label], score), 4)
        writer.put(pose.tobytes() + _COVARIANCE_ZEROS, 8)
        writer.put(_POSITION_FLAGS, 1)
        writer.put(twist.tobytes() + _COVARIANCE_ZEROS, 8)
        writer.put(_TWIST_FLAGS, 1)
        writer.put(_EMPTY_FOOTPRINT, 4)
        writer.put(size.tobytes(), 8)
    return writer.getvalue()


def objects_message_type() -> Any:
    """The ``DetectedObjects`` class; :class:`ConfigError` saying how to get it when missing."""
    try:
        from autoware_perception_msgs.msg import DetectedObjects
    except ImportError as error:
        raise ConfigError(MISSING_PACKAGE.format(error=error)) from None
    return DetectedObjects


def detections_to_objects(detections: Detections, header: Header) -> Any:
    """:func:`serialize_detected_objects` as a Python ``DetectedObjects`` message."""
    from rclpy.serialization import deserialize_message
    return deserialize_message(serialize_detected_objects(detections, header), objects_message_type())
