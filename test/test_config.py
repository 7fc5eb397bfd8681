"""Configuration: the shipped nuScenes YAML and rejection of bad values."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bevfusion_ros.config import ConfigError, PipelineConfig, config_from_dict, load_config, save_config

CONFIG = Path(__file__).resolve().parents[1] / "config" / "cuda-bevfusion-resnet50.yaml"


def test_resnet50_yaml_holds_the_nuscenes_values():
    config = load_config(CONFIG)
    assert config == PipelineConfig()            # the defaults are the nuScenes values too
    assert config.camera_names == ("FRONT", "FRONT_RIGHT", "FRONT_LEFT", "BACK", "BACK_LEFT", "BACK_RIGHT")
    image = config.image
    assert (image.input_width, image.input_height, image.output_width, image.output_height) == (1600, 900, 704, 256)
    assert image.resized_size == (768, 432) and image.crop == (32, 176)
    geometry = config.camera_geometry
    assert geometry.bev_size == (360, 360, 1) and geometry.depth_bins == 118
    assert (geometry.xbound, geometry.ybound, geometry.zbound, geometry.dbound) == \
        ((-54, 54, 0.3), (-54, 54, 0.3), (-10, 10, 20), (1, 60, 0.5))
    voxel = config.voxelization
    assert voxel.voxel_size == (0.075, 0.075, 0.2)
    assert voxel.point_range_min == (-54, -54, -5) and voxel.point_range_max == (54, 54, 3)
    assert voxel.grid_size == (1440, 1440, 40) and voxel.sparse_shape == (1440, 1440, 41)
    assert config.head.out_size_factor == 8 and config.bev_cell_size == pytest.approx((0.6, 0.6))
    assert config.head.score_threshold == 0.12
    assert config.head.class_names == ("car", "truck", "construction_vehicle", "bus", "trailer",
                                       "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone")


def test_plain_mapping_without_ros_wrapper():
    config = config_from_dict({"head": {"score_threshold": 0.3}, "lidar": {"max_points": 1000}})
    assert config.head.score_threshold == 0.3 and config.lidar.max_points == 1000
    assert isinstance(config.head.post_center_range, tuple)


@pytest.mark.parametrize("values, message", [
    ({"head": {"score_treshold": 0.3}}, "config 'head': unknown key(s) ['score_treshold']"),
    ({"imgae": {}}, "config '<top level>': unknown key(s) ['imgae']"),
    ({"head": {"score_threshold": "high"}}, "config 'head.score_threshold': expected a number"),
    ({"head": {"score_threshold": 1.5}}, "config 'head.score_threshold': must be in [0, 1]"),
    ({"lidar": {"max_points": 10.5}}, "config 'lidar.max_points': expected an integer"),
    ({"camera_geometry": {"dbound": [60, 1, 0.5]}}, "config 'camera_geometry.dbound': needs min < max"),
    ({"voxelization": {"voxel_size": [0.075, 0.0, 0.2]}}, "axis y: must be positive"),
    ({"voxelization": {"voxel_size": 0.1}}, "config 'voxelization.voxel_size': expected a list"),
    ({"image": {"resize_scale": 0.3}}, "resized image 480x270 is smaller than the network input"),
    ({"head": {"out_size_factor": 7}}, "voxel grid 1440x1440 is not divisible by 7"),
    ({"camera_names": ["A", "A"]}, "config 'camera_names': must be unique"),
    ({"head": {"score_threshold": float("nan")}}, "must be finite"),
])
def test_bad_values_are_rejected_with_the_key(values, message):
    with pytest.raises(ConfigError) as error:
        config_from_dict(values)
    assert message in str(error.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_save_and_load_round_trip(tmp_path):
    config = config_from_dict({"head": {"score_threshold": 0.25, "class_names": ["a", "b"]},
                               "voxelization": {"voxel_size": [0.3, 0.3, 0.2]}})
    save_config(config, tmp_path / "c.yaml", header="exported for a test\nsecond line")
    text = (tmp_path / "c.yaml").read_text()
    assert text.startswith("# exported for a test\n# second line\n/**:\n  ros__parameters:")
    assert load_config(tmp_path / "c.yaml") == config
