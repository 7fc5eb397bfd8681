"""The node's parameter descriptors: every config field is described from the shipped YAML
comments, typed from its dataclass field, read-only unless it may change at run time."""
from __future__ import annotations

from rcl_interfaces.msg import ParameterType

from bevfusion_ros.config import PipelineConfig
from bevfusion_ros.ros.parameters import RUNTIME_PARAMETERS, descriptors, parameter_values, yaml_comments
from bevfusion_ros.streaming.node_config import NodeConfig

SAMPLE = """\
/**:
  ros__parameters:
    node:
      queue_size: 1      # frames waiting
                         # (the oldest is dropped)
      # one topic per camera
      camera_topics: [/a,
                      /b]
      sync:
        slop_s: 0.1      # max stamp difference
    # a section
    image:
      input_width: 1600
"""


def test_comments_inline_continued_and_above():
    comments = yaml_comments(SAMPLE)
    assert comments["node.queue_size"] == "frames waiting (the oldest is dropped)"
    assert comments["node.camera_topics"] == "one topic per camera"
    assert comments["node.sync.slop_s"] == "max stamp difference"
    assert comments["image"] == "a section" and comments["image.input_width"] == ""


def test_every_parameter_is_typed_and_described():
    config, settings = PipelineConfig(), NodeConfig()
    described, values = descriptors(config, settings), parameter_values(config, settings)
    assert set(described) == set(values) and len(values) > 40
    assert all(not d.description.startswith("see config") for d in described.values()), \
        [name for name, d in described.items() if d.description.startswith("see config")]
    expected_types = {"camera_names": ParameterType.PARAMETER_STRING_ARRAY,
                      "image.mean": ParameterType.PARAMETER_DOUBLE_ARRAY,
                      "voxelization.max_voxels": ParameterType.PARAMETER_INTEGER,
                      "node.tf_timeout_s": ParameterType.PARAMETER_DOUBLE,
                      "node.publish_markers": ParameterType.PARAMETER_BOOL,
                      "node.sync.missing_camera": ParameterType.PARAMETER_STRING}
    assert {name: described[name].type for name in expected_types} == expected_types
    assert {name for name, d in described.items() if not d.read_only} == set(RUNTIME_PARAMETERS)
    assert values["image.mean"] == list(config.image.mean) and isinstance(values["node.tf_timeout_s"], float)
