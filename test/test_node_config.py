"""How the node's parameters and its model folder's bevfusion.yaml combine (ROS-free), and the
command-line parameters rcl would silently drop."""
from __future__ import annotations

from pathlib import Path

import pytest

from bevfusion_ros.config import ConfigError, config_to_dict, load_config
from bevfusion_ros.streaming.node_config import command_line_parameters, configs_from_parameters, nest_dotted

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = load_config(REPO_ROOT / "models" / "tiny-synthetic" / "bevfusion.yaml")
R50_GEOMETRY = REPO_ROOT / "config" / "cuda-bevfusion-resnet50.yaml"
NODE_PARAMS = REPO_ROOT / "config" / "nuscenes.yaml"


def yaml_parameters(path: Path) -> dict:
    import yaml
    return yaml.safe_load(path.read_text())


def test_the_shipped_node_params_start_any_model_folder():
    """Defect: config/nuscenes.yaml's pipeline sections overrode the model's bevfusion.yaml, so
    the README's command failed on models/tiny-synthetic (img [1,6,3,128,256] vs 256x704)."""
    pipeline, node = configs_from_parameters(yaml_parameters(NODE_PARAMS), TINY)
    assert pipeline == TINY
    assert node.sync.backwards_tolerance_s == 1.0 and node.tf_timeout_s == 0.1
    assert (node.output_frame, node.publish_autoware_objects, node.class_score_thresholds) == ("", False, ("",))


def test_class_thresholds_are_checked_against_the_models_classes():
    """TINY's classes are nuScenes': a class of another model is refused at start-up."""
    _, node = configs_from_parameters({"node": {"class_score_thresholds": ["car:0.3", "traffic_cone:0.6"]}}, TINY)
    assert node.class_score_thresholds == ("car:0.3", "traffic_cone:0.6")
    with pytest.raises(ConfigError, match="unknown class 'Car'.*'traffic_cone'"):
        configs_from_parameters({"node": {"class_score_thresholds": ["Car:0.3"]}}, TINY)


def test_parameters_repeating_the_model_geometry_are_accepted():
    parameters = {**config_to_dict(TINY), "node": {"backend": "cpu"}}
    pipeline, node = configs_from_parameters(parameters, TINY)
    assert pipeline == TINY and node.backend == "cpu"


def test_a_geometry_conflict_names_each_key_and_the_file_that_wins():
    parameters = {**yaml_parameters(R50_GEOMETRY)["/**"]["ros__parameters"], "node": {}}
    with pytest.raises(ConfigError) as error:
        configs_from_parameters(parameters, TINY, "models/tiny-synthetic/bevfusion.yaml")
    message = str(error.value)
    assert "image.output_width=704 (the model says 256)" in message
    assert "image.output_height=256 (the model says 128)" in message
    assert "models/tiny-synthetic/bevfusion.yaml wins, because it is the geometry" in message


def test_score_threshold_may_be_tuned_and_is_validated():
    pipeline, _ = configs_from_parameters({"head": {"score_threshold": 0.3}}, TINY)
    assert pipeline.head.score_threshold == 0.3 and pipeline.image == TINY.image
    with pytest.raises(ConfigError, match="head.score_threshold"):
        configs_from_parameters({"head": {"score_threshold": 3.0}}, TINY)


def test_without_a_model_config_the_parameters_give_the_geometry():
    pipeline, _ = configs_from_parameters(yaml_parameters(R50_GEOMETRY), None)
    assert pipeline == load_config(R50_GEOMETRY)
    with pytest.raises(ConfigError, match="config/cuda-bevfusion-resnet50.yaml"):
        configs_from_parameters({"node": {}}, None, "nvidia/model/resnet50/bevfusion.yaml")


@pytest.mark.parametrize("name, value, message", [
    ("node.queue_size", "two", "config 'node.queue_size': expected a number, got 'two'"),
    ("node.queue_size", 2.5, "config 'node.queue_size': expected an integer"),
    ("node.sync.slop_s", "abc", "config 'node.sync.slop_s': expected a number"),
    ("node.sync.backwards_tolerance_s", -1.0, "node.sync.backwards_tolerance_s': must be >= 0"),
    ("node.tf_timeout_s", -0.1, "node.tf_timeout_s': must be >= 0"),
    ("node.sync.max_future_s", True, "node.sync.max_future_s': expected a number"),
    ("node.class_score_thresholds", ["car:0.3", "lorry:0.2"], "node.class_score_thresholds: unknown class 'lorry'"),
    ("node.class_score_thresholds", ["car=0.3"], "node.class_score_thresholds: entry 'car=0.3' is not"),
    ("node.class_score_thresholds", "car:0.3", "config 'node.class_score_thresholds': expected a list"),
    ("node.output_frame", 5, "config 'node.output_frame': expected str"),
    ("node.publish_autoware_objects", "yes", "config 'node.publish_autoware_objects': expected bool"),
])
def test_wrong_typed_or_bad_node_values_name_the_parameter(name, value, message):
    with pytest.raises(ConfigError) as error:
        configs_from_parameters(nest_dotted({name: value}), TINY)
    assert message in str(error.value)


def test_command_line_parameters_as_rcl_parses_them():
    """rcl keeps the params file's value when a -p value has another type (so -p
    node.queue_size:=two was silently ignored): the node reads the command line itself."""
    argv = ["bevfusion_node", "-p", "not:=ros", "--ros-args", "--params-file", "x.yaml", "-p", "node.queue_size:=two",
            "--param", "node.sync.slop_s:=0.2", "-p", "bevfusion:node.backend:=cpu", "-p", "flags:=[1, 2]",
            "-p", "other_node:node.backend:=gpu",
            "-r", "a:=b", "--", "-p", "after:=1"]
    assert command_line_parameters(argv) == {"node.queue_size": "two", "node.sync.slop_s": 0.2,
                                             "node.backend": "cpu", "flags": [1, 2]}
    assert command_line_parameters(["bevfusion_node"]) == {}
