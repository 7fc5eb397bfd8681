"""Custom camera rigs: the rig YAML (bevfusion_ros.io.rig), mountings against the optical axes
written out by hand, image configs and presets fitted to a rig, scenes rendered for a rig, the
tools' --rig/--cameras options and the node parameters of a rig. (The four-camera rig end to
end, training and node included: test/ros/test_rig_end_to_end.py.)"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from bevfusion_ros.config import NUSCENES_CAMERA_NAMES, ConfigError, ImageConfig
from bevfusion_ros.io.frame import load_example_data
from bevfusion_ros.io.rig import Rig, RigError, load_rig, mounting_transform, parse_camera_names, rig_from_dict
from bevfusion_ros.model.presets import NUSCENES_R50, TINY
from bevfusion_ros.sim.rig import GROUND_Z, SYNTHETIC_RIG, select_rig, synthetic_rig
from bevfusion_ros.sim.scene import CLASS_SPECS, build_scene, generate_scene
from bevfusion_ros.streaming.node_config import configs_from_parameters
from bevfusion_ros.tools import make_scene

REPO_ROOT = Path(__file__).resolve().parents[1]
FOUR_CAMERA = REPO_ROOT / "config" / "rigs" / "four-camera.yaml"
K = {"fx": 500.0, "fy": 480.0, "cx": 320.0, "cy": 240.0}


@pytest.fixture(scope="module")
def four_camera() -> Rig:
    return load_rig(FOUR_CAMERA)


def rotated(vector: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: ``vector`` turned by ``angle`` (rad, right hand) about the unit ``axis``."""
    return (vector * math.cos(angle) + np.cross(axis, vector) * math.sin(angle)
            + axis * (axis @ vector) * (1 - math.cos(angle)))


def axes_written_out(position, yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """camera2lidar from the optical axes: forward along the heading tilted down by the pitch,
    right horizontal, then both rolled about forward (left side up); down = forward x right."""
    yaw, pitch, roll = np.radians([yaw_deg, pitch_deg, roll_deg])
    forward = np.array([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), -math.sin(pitch)])
    right = rotated(np.array([math.sin(yaw), -math.cos(yaw), 0.0]), forward, roll)
    matrix = np.eye(4)
    matrix[:3, :3] = np.stack([right, np.cross(forward, right), forward], axis=1)
    matrix[:3, 3] = position
    return matrix


def one_camera(**mounting) -> dict:
    return {"name": "cam", "image_size": [640, 480], "intrinsics": dict(K), **mounting}


# ----------------------------------------------------------------------------- mounting
def test_mounting_transform_matches_the_axes_written_out():
    rng = np.random.default_rng(0)
    for yaw, pitch, roll in [(0, 0, 0), (90, 0, 0), (-135, 20, 0), (30, -10, 45)] + \
            [tuple(rng.uniform(-180, 180, 3)) for _ in range(20)]:
        position = rng.uniform(-2, 2, 3)
        np.testing.assert_allclose(mounting_transform(position, yaw, pitch, roll),
                                   axes_written_out(position, yaw, pitch, roll), atol=1e-12)


def test_a_pitched_camera_sees_the_horizon_above_its_centre():
    rig = rig_from_dict({"cameras": [one_camera(position=[1.0, 2.0, -0.3], yaw=90.0, pitch=10.0)]})
    calibration = rig.calibration(ImageConfig())

    def pixel(point):
        projected = calibration.lidar2image[0] @ np.append(point, 1.0)
        return projected[:2] / projected[2]

    # Along the optical axis: the principal point. Far ahead at the camera's height (the
    # horizon, heading 90 deg = +y): fy tan(10 deg) above it.
    forward = np.array([0.0, math.cos(math.radians(10)), -math.sin(math.radians(10))])
    np.testing.assert_allclose(pixel(np.array([1.0, 2.0, -0.3]) + 7.0 * forward), [K["cx"], K["cy"]], atol=1e-9)
    u, v = pixel(np.array([1.0, 2.0 + 1e6, -0.3]))
    assert u == pytest.approx(K["cx"], abs=1e-6)
    assert v == pytest.approx(K["cy"] - K["fy"] * math.tan(math.radians(10)), abs=1e-3)
    u, _ = pixel(np.array([1.0 + 5.0, 2.0 + 20.0, -0.3]))        # +x is right of heading +y: right in the image
    assert u > K["cx"]


# ----------------------------------------------------------------------------- rig YAML
def test_rig_yaml_defaults_and_both_mounting_forms(tmp_path):
    second = mounting_transform([-1.0, 0.2, -0.4], 170.0, 5.0, -3.0)
    text = yaml.safe_dump({"name": "two", "defaults": {"image_size": [640, 480], "intrinsics": K},
                           "cameras": [{"name": "ahead", "position": [0.5, 0.0, -0.3], "yaw": 0.0},
                                       {"name": "behind", "camera2lidar": second.tolist(),
                                        "intrinsics": {"fx": 300.0, "fy": 300.0, "cx": 330.0, "cy": 250.0}}]})
    (tmp_path / "two.yaml").write_text(text)
    rig = load_rig(tmp_path / "two.yaml")
    assert rig.name == "two" and rig.camera_names == ("ahead", "behind") and rig.image_size == (640, 480)
    np.testing.assert_allclose(rig.intrinsics()[0], [[500, 0, 320], [0, 480, 240], [0, 0, 1]])
    np.testing.assert_allclose(rig.intrinsics()[1], [[300, 0, 330], [0, 300, 250], [0, 0, 1]])
    np.testing.assert_allclose(rig.camera2lidar()[0], axes_written_out([0.5, 0.0, -0.3], 0, 0, 0), atol=1e-12)
    np.testing.assert_array_equal(rig.camera2lidar()[1], second)
    moved = rig_from_dict({**yaml.safe_load(text), "cameras": [
        {"name": "ahead", "position": [0.6, 0.0, -0.3], "yaw": 0.0}, yaml.safe_load(text)["cameras"][1]]})
    assert moved.tag() != rig.tag() and rig.tag().startswith("two-")
    assert load_rig(tmp_path / "two.yaml").tag() == rig.tag()
    del_name = yaml.safe_load(text)
    del del_name["name"]
    (tmp_path / "unnamed.yaml").write_text(yaml.safe_dump(del_name))
    assert load_rig(tmp_path / "unnamed.yaml").name == "unnamed"        # the file name


@pytest.mark.parametrize("change,message", [
    (lambda r: r["cameras"][1].update(image_size=[800, 600]),
     r"cameras differ in image size \(a 640x480, b 800x600\).*one common size"),
    (lambda r: r["cameras"][1].update(name="a"), r"camera names must be unique, repeated: \['a'\]"),
    (lambda r: r["cameras"][0].update(focal=3), r"camera 0 \(a\): unknown key\(s\) \['focal'\]"),
    (lambda r: r["cameras"][1].pop("yaw"), r"camera 1 \(b\): missing 'yaw'"),
    (lambda r: r["cameras"][0].update(camera2lidar=np.eye(4).tolist()),
     r"camera 0 \(a\): give camera2lidar or position \+ yaw/pitch/roll, not both"),
    (lambda r: r["cameras"][1].update(intrinsics={"fx": 1, "fy": 1, "cx": 1}), r"camera 1 \(b\) intrinsics: expected"),
    (lambda r: r["cameras"][0].update(image_size=[640.5, 480]), r"image_size: expected \[width, height\] in whole"),
    (lambda r: r["cameras"][0].update(position=[0, "x", 0]), r"camera 0 \(a\) position: expected 3 numbers"),
    (lambda r: r.update(cameras=[]), r"'cameras' must be a non-empty list"),
    (lambda r: r.update(lidar="top"), r"unknown key\(s\) \['lidar'\]"),
    (lambda r: r["cameras"][0].update(intrinsics={**K, "fx": -5.0}), r"rig test: camera 0 \(a\): .*focal lengths"),
    (lambda r: r["cameras"].__setitem__(1, {"name": "b", "image_size": [640, 480], "intrinsics": K,
                                            "camera2lidar": np.diag([1.0, 1.0, 2.0, 1.0]).tolist()}),
     r"camera 1 \(b\): camera2lidar rotation is not a proper rotation"),
], ids=["sizes", "names", "unknown", "yaw", "both", "intrinsics", "size", "position", "empty", "top-level",
        "focal", "rotation"])
def test_bad_rigs_are_refused_naming_what_is_wrong(change, message):
    values = {"name": "test", "cameras": [one_camera(position=[0, 0, 0], yaw=0) | {"name": "a"},
                                          one_camera(position=[0, 0, 0], yaw=90) | {"name": "b"}]}
    change(values)
    with pytest.raises(RigError, match=message):
        rig_from_dict(values, "test")


def test_the_shipped_four_camera_rig_sees_all_around(four_camera):
    assert four_camera.camera_names == ("front", "left", "rear", "right")
    assert four_camera.image_size == (1280, 720)
    headings = {"front": 0.0, "left": 90.0, "rear": 180.0, "right": -90.0}
    calibration = four_camera.calibration(ImageConfig().for_input_size(1280, 720))
    for index, name in enumerate(four_camera.camera_names):
        forward = calibration.camera2lidar[index, :3, 2]
        assert math.degrees(math.atan2(forward[1], forward[0])) == pytest.approx(headings[name], abs=1e-9)
        assert calibration.camera2lidar[index, 2, 3] - GROUND_Z > 1.0        # above the ground
    # Every horizontal direction 30 m away at camera height is inside some camera's image.
    for azimuth in np.radians(np.arange(0.0, 360.0, 1.0)):
        point = np.array([30 * math.cos(azimuth), 30 * math.sin(azimuth), -0.3, 1.0])
        projected = calibration.lidar2image @ point                            # [N, 4]
        u = projected[:, 0] / projected[:, 2]
        v = projected[:, 1] / projected[:, 2]
        assert ((projected[:, 2] > 0) & (u >= 0) & (u < 1280) & (v >= 0) & (v < 720)).any(), math.degrees(azimuth)


def test_select_rig_picks_cameras_in_the_given_order(four_camera):
    rig = select_rig(None, "BACK,FRONT")
    assert rig.camera_names == ("BACK", "FRONT")
    full_intrinsics, full_camera2lidar = synthetic_rig()
    np.testing.assert_array_equal(rig.camera2lidar(), full_camera2lidar[[3, 0]])
    np.testing.assert_array_equal(synthetic_rig(("BACK", "FRONT"))[0], full_intrinsics[[3, 0]])
    assert select_rig() is SYNTHETIC_RIG and select_rig(FOUR_CAMERA).camera_names == four_camera.camera_names
    assert select_rig(FOUR_CAMERA, ["rear"]).camera_names == ("rear",)
    with pytest.raises(RigError, match=r"has no camera\(s\) \['SIDE'\]; its cameras: \['FRONT', 'FRONT_RIGHT'"):
        select_rig(None, "FRONT,SIDE")
    with pytest.raises(RigError, match="without empty names"):
        parse_camera_names("FRONT,,BACK")


# ----------------------------------------------------------------------------- image config, preset
@pytest.mark.parametrize("size", [(1280, 720), (1920, 1080), (640, 480), (1600, 1200), (1000, 1000)])
@pytest.mark.parametrize("preset", [NUSCENES_R50, TINY], ids=lambda p: p.name)
def test_image_config_for_another_size_keeps_the_network_input(size, preset):
    base = preset.pipeline.image
    image = base.for_input_size(*size)
    assert (image.input_width, image.input_height) == size
    assert (image.output_width, image.output_height, image.mean, image.std) == \
        (base.output_width, base.output_height, base.mean, base.std)
    assert image.resized_size[0] == base.resized_size[0] == int(size[0] * image.resize_scale)
    assert image.resize_scale == pytest.approx(base.resized_size[0] / size[0], rel=1e-15)
    assert image.resized_size[1] == int(size[1] * image.resize_scale) >= image.output_height
    crop_x, crop_y = image.crop
    assert crop_x == (base.resized_size[0] - base.output_width) // 2 and crop_y >= 0
    assert base.for_input_size(base.input_width, base.input_height) is base


def test_image_config_refuses_a_size_too_flat_for_the_network_input():
    with pytest.raises(ConfigError, match=r"resized image 768x201 is smaller than the network input 704x256"):
        NUSCENES_R50.pipeline.image.for_input_size(1920, 503)


def test_preset_for_a_rig(four_camera):
    assert TINY.for_rig(SYNTHETIC_RIG) is TINY and NUSCENES_R50.for_rig(SYNTHETIC_RIG) is NUSCENES_R50
    fitted = TINY.for_rig(four_camera)
    assert fitted.pipeline.camera_names == ("front", "left", "rear", "right")
    assert fitted.pipeline.image == TINY.pipeline.image.for_input_size(1280, 720)
    assert fitted.pipeline.image.resize_scale == pytest.approx(0.2)
    assert (fitted.camera, fitted.lidar, fitted.fuser, fitted.head, fitted.name) == \
        (TINY.camera, TINY.lidar, TINY.fuser, TINY.head, TINY.name)
    assert fitted.for_rig(four_camera) is fitted
    two = TINY.for_rig(SYNTHETIC_RIG.select(("FRONT", "BACK")))
    assert two.pipeline.camera_names == ("FRONT", "BACK") and two.pipeline.image == TINY.pipeline.image


def test_model_weights_do_not_depend_on_the_rig(four_camera):
    torch = pytest.importorskip("torch")
    from bevfusion_ros.model.bevfusion import build_model
    from bevfusion_ros.model.camera import camera_sample_inputs
    six, four = build_model(TINY, 1).state_dict(), build_model(TINY.for_rig(four_camera), 1).state_dict()
    assert six.keys() == four.keys() and all(torch.equal(six[name], four[name]) for name in six)
    img, depth = camera_sample_inputs(TINY.for_rig(four_camera), seed=0)
    assert img.shape == (1, 4, 3, 128, 256) and depth.shape == (1, 4, 1, 128, 256)


# ----------------------------------------------------------------------------- scenes
def test_scene_of_a_rig_has_its_images_and_the_same_objects(four_camera):
    scene, nuscenes = generate_scene(5, 6, azimuth_steps=180, rig=four_camera), generate_scene(5, 6, azimuth_steps=180)
    np.testing.assert_array_equal(scene.gt_boxes, nuscenes.gt_boxes)
    np.testing.assert_array_equal(scene.points, nuscenes.points)
    assert [image.shape for image in scene.images] == [(720, 1280, 3)] * 4
    assert scene.calibration.camera_names == four_camera.camera_names
    np.testing.assert_array_equal(scene.calibration.camera2lidar, four_camera.camera2lidar())


@pytest.mark.parametrize("camera,heading", [("left", 90.0), ("rear", 180.0), ("front", 0.0)])
def test_a_box_in_front_of_a_rig_camera_is_drawn_where_it_projects(four_camera, camera, heading):
    """A car 12 m along the camera's heading: the pixel its centre projects to (K and the
    mounting written out) shows the car's class colour, shaded; far above it is sky."""
    index = four_camera.camera_names.index(camera)
    position = four_camera.camera2lidar()[index, :3, 3]
    direction = np.array([math.cos(math.radians(heading)), math.sin(math.radians(heading))])
    centre = np.append(position[:2] + 12.0 * direction, GROUND_Z + 0.85)
    car = np.array([[*centre, 1.9, 4.6, 1.7, 0.3, 0.0, 0.0]])
    scene = build_scene(car, np.array([0]), seed=1, azimuth_steps=90, rig=four_camera)
    mounting = {"front": (0.70, 0.00, -0.24, 0.0, 3.0), "left": (0.20, 0.95, -0.40, 90.0, 0.0),
                "rear": (-1.00, 0.00, -0.30, 180.0, 0.0)}[camera]
    camera2lidar = axes_written_out(mounting[:3], mounting[3], mounting[4], 0.0)
    local = np.linalg.inv(camera2lidar) @ np.append(centre, 1.0)
    u, v = 560.0 * local[0] / local[2] + 640.0, 560.0 * local[1] / local[2] + 360.0
    pixel = scene.images[index][int(round(v)), int(round(u))].astype(float)
    color = np.array(CLASS_SPECS["car"].color, dtype=float)
    scale = pixel @ color / (color @ color)
    assert 0.45 <= scale <= 1.01 and np.abs(pixel - scale * color).max() <= 1.5, (pixel, color)
    sky = scene.images[index][5, int(round(u))].astype(float)
    assert sky[2] > sky[0] + 10                                    # bluish


def test_make_scene_cli_writes_the_rigs_cameras(tmp_path, capsys, four_camera):
    out = tmp_path / "scene"
    assert make_scene.main(["--seed", "4", "--out", str(out), "--objects", "3", "--azimuth-steps", "90",
                            "--rig", str(FOUR_CAMERA), "--cameras", "rear,front"]) == 0
    assert "images: 2 x 1280x720 RGB (rear, front)" in capsys.readouterr().out
    assert sorted(path.name for path in out.glob("*.jpg")) == ["0-rear.jpg", "1-front.jpg"]
    frame = load_example_data(out)
    assert frame.calibration.camera_names == ("rear", "front")
    np.testing.assert_allclose(frame.calibration.camera2lidar, four_camera.camera2lidar()[[2, 0]], atol=1e-6)
    reference = generate_scene(4, 3, azimuth_steps=90, rig=four_camera.select(("rear", "front")))
    assert np.abs(frame.images[0].astype(int) - reference.images[0].astype(int)).mean() < 2.0   # JPEG
    with pytest.raises(SystemExit):
        make_scene.main(["--seed", "4", "--out", str(out), "--cameras", "FRONT,NOSE"])
    assert "has no camera(s) ['NOSE']" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tools
def test_train_and_export_clis_report_a_bad_rig(tmp_path, capsys):
    pytest.importorskip("torch")
    from bevfusion_ros.tools import export, train
    (tmp_path / "bad.yaml").write_text("cameras: [{name: a}]\n")
    assert train.main(["--preset", "tiny", "--out", str(tmp_path / "t"), "--rig", str(tmp_path / "bad.yaml")]) == 1
    assert "bad.yaml camera 0 (a): missing 'image_size'" in capsys.readouterr().err
    assert export.main(["--preset", "tiny", "--out", str(tmp_path / "e"), "--cameras", "FRONT,NOSE"]) == 1
    assert "has no camera(s) ['NOSE']" in capsys.readouterr().err
    assert not (tmp_path / "t" / "model.pt").exists() and not (tmp_path / "e").exists()


def test_eval_generates_the_scenes_of_its_rig(four_camera, capsys):
    from bevfusion_ros.tools import eval as eval_tool
    frames = list(eval_tool.synthetic_frames(range(2, 3), 3, False, rig=four_camera))
    assert frames[0].frame.calibration.camera_names == four_camera.camera_names
    assert [image.shape for image in frames[0].frame.images] == [(720, 1280, 3)] * 4
    np.testing.assert_array_equal(frames[0].gt_boxes, generate_scene(2, 3).gt_boxes)
    for wrong in (["--seeds", "1", "--cameras", "FRONT,NOSE"], ["--data", ".", "--rig", str(FOUR_CAMERA)]):
        with pytest.raises(SystemExit):
            eval_tool.main(["--model", "nowhere", *wrong])
    assert "--rig and --cameras choose the cameras of generated scenes" in capsys.readouterr().err


def test_the_dataset_refuses_a_preset_of_another_rig(four_camera):
    pytest.importorskip("torch")
    from bevfusion_ros.train.data import SceneDataset
    with pytest.raises(RigError, match=r"preset tiny has cameras \['FRONT'.*1600x900\), the scenes' "
                                       r"rig four-camera: 4 cameras"):
        SceneDataset(TINY, [0], rig=four_camera)
    assert SceneDataset(TINY.for_rig(four_camera), [0], rig=four_camera).rig is four_camera


# ----------------------------------------------------------------------------- node parameters
def test_node_parameters_express_a_rig(four_camera):
    model = TINY.for_rig(four_camera).pipeline
    config, settings = configs_from_parameters({"node": {"model_dir": "m"}}, model)
    assert config == model
    assert settings.camera_topics == ("/CAM_front/image_raw", "/CAM_left/image_raw", "/CAM_rear/image_raw",
                                      "/CAM_right/image_raw")
    assert settings.info_topics()[2] == "/CAM_rear/camera_info"
    # Other names for the four cameras (the networks fix only their number), topics follow.
    config, settings = configs_from_parameters({"camera_names": ["a", "b", "c", "d"]}, model)
    assert config.camera_names == ("a", "b", "c", "d") and settings.camera_topics[3] == "/CAM_d/image_raw"
    # Another image size: the resize that keeps the network input, unless a resize is given.
    config, _ = configs_from_parameters({"image": {"input_width": 1920, "input_height": 1080}}, model)
    assert config.image == model.image.for_input_size(1920, 1080)
    assert config.image.resize_scale == pytest.approx(256 / 1920)
    config, _ = configs_from_parameters({"image": {"input_width": 1920, "input_height": 1080,
                                                   "resize_scale": 0.15}}, model)
    assert config.image.resize_scale == 0.15 and config.image.resized_size == (288, 162)


def test_node_parameters_refuse_another_camera_count(four_camera):
    model = TINY.for_rig(four_camera).pipeline
    with pytest.raises(ConfigError, match=r"the parameters name 6 cameras \['FRONT', .*'BACK_RIGHT'\], the model "
                                          r"of m/bevfusion.yaml was exported for 4 cameras \['front', 'left', "
                                          r"'rear', 'right'\]"):
        configs_from_parameters({"camera_names": list(NUSCENES_CAMERA_NAMES)}, model, "m/bevfusion.yaml")
    with pytest.raises(ConfigError, match=r"node.camera_topics.*needs one topic per camera \(4"):
        configs_from_parameters({"node": {"camera_topics": ["/a", "/b"]}}, model)
    with pytest.raises(ConfigError, match=r"camera_geometry.dbound=.*the model says"):
        configs_from_parameters({"camera_geometry": {"dbound": [1.0, 50.0, 1.0]}}, model)


def test_the_rig_parameters_are_described():
    """``ros2 param describe`` explains the rig's parameters (from the shipped YAML comments,
    also camera_names, which sits first under ros__parameters)."""
    pytest.importorskip("rcl_interfaces")
    from bevfusion_ros.ros.parameters import parameter_descriptions, yaml_comments
    descriptions = parameter_descriptions()
    assert "camera.backbone's camera batch" in descriptions["camera_names"]
    assert "/CAM_<name>/image_raw" in descriptions["node.camera_topics"]
    assert "one size for all cameras" in descriptions["image.input_width"]
    comments = yaml_comments("a:\n  # about b\n  b: 1\n  c: 2   # about c\n    # more on c\n  d: 3\n")
    assert comments == {"a": "", "a.b": "about b", "a.c": "about c more on c", "a.d": ""}
