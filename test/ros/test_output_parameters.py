"""The output parameters as declared (bevfusion_ros.ros.parameters): types, read-only or run-time,
descriptions taken from config/nuscenes.yaml, values as ROS parameters carry them."""
from __future__ import annotations

from pathlib import Path

from rcl_interfaces.msg import ParameterType

from bevfusion_ros.config import load_config
from bevfusion_ros.ros import parameters
from bevfusion_ros.streaming.node_config import NodeConfig

TINY = load_config(Path(__file__).resolve().parents[2] / "models" / "tiny-synthetic" / "bevfusion.yaml")


def test_output_parameters_are_described_and_only_the_thresholds_change_at_run_time():
    settings = NodeConfig(class_score_thresholds=("car:0.3",), output_frame="base_link").validate(TINY)
    described = parameters.descriptors(TINY, settings)
    thresholds, frame, objects = (described[f"node.{name}"] for name in (
        "class_score_thresholds", "output_frame", "publish_autoware_objects"))
    assert (thresholds.type, thresholds.read_only) == (ParameterType.PARAMETER_STRING_ARRAY, False)
    assert "class:threshold" in thresholds.description and "run time" in thresholds.description
    assert (frame.type, frame.read_only) == (ParameterType.PARAMETER_STRING, True)
    assert "base_link" in frame.description and "not published" in frame.description
    assert (objects.type, objects.read_only) == (ParameterType.PARAMETER_BOOL, True)
    assert "DetectedObjects" in objects.description
    values = parameters.parameter_values(TINY, settings)
    assert values["node.class_score_thresholds"] == ["car:0.3"] and values["node.output_frame"] == "base_link"
    assert parameters.parameter_values(TINY, NodeConfig())["node.class_score_thresholds"] == [""]
