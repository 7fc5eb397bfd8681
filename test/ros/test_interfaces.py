"""The interface packages built from msg/: upstream type hashes, fields and constants.

The expected RIHS01 hashes were read from the rosidl-generated C sources
(``*__description.c``, ``*__struct.h``) of upstream vision_msgs 4.x and tf2_msgs builds published
in public repositories; Detection3DArray's value was also found, identical, in an independent
project. Matching them means real ROS 2 nodes accept our messages (same type, same wire format).
BoundingBox2DArray, BoundingBox3DArray and the tf2_msgs action have no upstream value here, so
they are not listed (their fields are checked below).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

UPSTREAM_HASHES = {
    "vision_msgs/msg/BoundingBox2D": "008eacbb0cf8f26e83795547bed013eec3675485ef386ec056d80eaaf1c1ce2f",
    "vision_msgs/msg/BoundingBox3D": "bbb73a65c163d7f9bb29009c7bde9f7faa576bd2d23299c4511d19230dab4698",
    "vision_msgs/msg/Classification": "f74db28d0eaef3afb78f48bf2161cd709a1383a0309d3454383b25be11345143",
    "vision_msgs/msg/Detection2D": "0d12b69df5c593b3455b7346fac8205437a7d4bcb09b9e0e0b2dde787ded38ea",
    "vision_msgs/msg/Detection2DArray": "214274120007f4a683866481336b70310268cfa107aebe9d594a6acf75bda968",
    "vision_msgs/msg/Detection3D": "ddd703be132ab0b69d33121f1bb034132bfbb3b0ac5f9fb1516005ba1c8a265b",
    "vision_msgs/msg/Detection3DArray": "793f5eab9595ac1c0da07873cc859db42eae51f0ee76056db8562515d830e018",
    "vision_msgs/msg/LabelInfo": "3d37df4015cdf660cc851c51897f2acd957e1ca6205ba0a99aebffb9406b0783",
    "vision_msgs/msg/ObjectHypothesis": "51da43cec11c01957a64d1e05a24acd18aae7745ec30b74348ad5f6d634f7f90",
    "vision_msgs/msg/ObjectHypothesisWithPose": "41c12344c0396c48b81df12467c192d99b2a0eb1463c5c37194e4223251c80bc",
    "vision_msgs/msg/Point2D": "eab0e83f44ab4de92ceaf76dd7d0e7638f2bdd1d16ffbe16c7a136c48e407247",
    "vision_msgs/msg/Pose2D": "b0b5d1d7b4c20dd4fcde3ed1d4b289a919290572007d67a97043814db25d3648",
    "vision_msgs/msg/VisionClass": "1e4a11f0fed50b5623cb8ff26ca0e37952a48a9c074d16f804b44e9164c2037a",
    "vision_msgs/msg/VisionInfo": "95d3116a17484ad91c9a2686e1d54890bbfc3ff6c6a2de137738c4950d45d284",
    "tf2_msgs/msg/TFMessage": "e369d0f05a23ae52508854b66f6aa0437f3449d652e8cbf22d5abe85d020f087",
    "tf2_msgs/msg/TF2Error": "db2485e7d6a0ec75bf087e058ee45df682acc3a621ca7780503d10aac141809a",
    "tf2_msgs/srv/FrameGraph": "0d1fbc6222c018ba5f33822904a2fdd4063705289956d3fdde07cd8c50fe8067",
}


def installed_type_hash(type_name: str) -> str:
    """The RIHS01 hash in the type description JSON that rosidl installed for ``type_name``."""
    package, kind, name = type_name.split("/")
    module = importlib.import_module(package)
    prefix = Path(module.__file__).resolve().parents[4]  # <prefix>/lib/pythonX.Y/site-packages/<pkg>
    description = json.loads((prefix / "share" / package / kind / f"{name}.json").read_text())
    (entry,) = [h for h in description["type_hashes"] if h["type_name"] == type_name]
    return entry["hash_string"]


@pytest.mark.parametrize("type_name", sorted(UPSTREAM_HASHES))
def test_type_hash_equals_upstream(type_name):
    assert installed_type_hash(type_name) == "RIHS01_" + UPSTREAM_HASHES[type_name]


def test_vision_msgs_has_all_upstream_messages():
    import vision_msgs.msg as m

    expected = {
        "BoundingBox2D", "BoundingBox2DArray", "BoundingBox3D", "BoundingBox3DArray", "Classification",
        "Detection2D", "Detection2DArray", "Detection3D", "Detection3DArray", "LabelInfo",
        "ObjectHypothesis", "ObjectHypothesisWithPose", "Point2D", "Pose2D", "VisionClass", "VisionInfo",
    }
    assert {name for name in expected if hasattr(m, name)} == expected
    assert m.BoundingBox3DArray.get_fields_and_field_types() == {
        "header": "std_msgs/Header", "boxes": "sequence<vision_msgs/BoundingBox3D>"}
    assert m.BoundingBox2DArray.get_fields_and_field_types() == {
        "header": "std_msgs/Header", "boxes": "sequence<vision_msgs/BoundingBox2D>"}


def test_frame_info_fields():
    from bevfusion_ros_msgs.msg import FrameInfo

    assert FrameInfo.get_fields_and_field_types() == {
        "header": "std_msgs/Header",
        "cameras_used": "sequence<string>",
        "cameras_missing": "sequence<string>",
        "velocities": "sequence<geometry_msgs/Vector3>",
        "backend": "string",
        "latency_ms": "float",
        "warnings": "sequence<string>",
        "timing_names": "sequence<string>",
        "timing_ms": "sequence<float>",
    }


def test_tf2_msgs_fields_and_constants():
    from tf2_msgs.action import LookupTransform
    from tf2_msgs.msg import TF2Error, TFMessage
    from tf2_msgs.srv import FrameGraph

    assert TFMessage.get_fields_and_field_types() == {"transforms": "sequence<geometry_msgs/TransformStamped>"}
    assert TF2Error.get_fields_and_field_types() == {"error": "uint8", "error_string": "string"}
    constants = ("NO_ERROR", "LOOKUP_ERROR", "CONNECTIVITY_ERROR", "EXTRAPOLATION_ERROR",
                 "INVALID_ARGUMENT_ERROR", "TIMEOUT_ERROR", "TRANSFORM_ERROR")
    assert [getattr(TF2Error, name) for name in constants] == list(range(7))
    assert FrameGraph.Response.get_fields_and_field_types() == {"frame_yaml": "string"}
    assert LookupTransform.Goal.get_fields_and_field_types() == {
        "target_frame": "string", "source_frame": "string", "source_time": "builtin_interfaces/Time",
        "timeout": "builtin_interfaces/Duration", "target_time": "builtin_interfaces/Time",
        "fixed_frame": "string", "advanced": "boolean"}
    assert LookupTransform.Result.get_fields_and_field_types() == {
        "transform": "geometry_msgs/TransformStamped", "error": "tf2_msgs/TF2Error"}
