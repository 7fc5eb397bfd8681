"""The four-camera rig of ``config/rigs/four-camera.yaml`` end to end, on the CPU with the tiny
preset: scenes written by ``bevfusion-make-scene --rig``, a few training steps exported by
``bevfusion-train --rig ... --export``, the pipeline on a scene folder against the PyTorch
reference of the trained weights, and ``bevfusion_node`` (another process, over DDS) on that
frame's messages against the pipeline, with its own camera names and default topics.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import yaml
from conftest import as_the_node_rebuilds
from node_harness import FRAME_TIMEOUT_S, NodeUnderTest, assert_same_boxes

from bevfusion_ros.config import ConfigError, load_config
from bevfusion_ros.engines.base import EngineInterfaceError
from bevfusion_ros.io.calibration import Calibration
from bevfusion_ros.io.frame import Frame, load_example_data
from bevfusion_ros.io.rig import load_rig
from bevfusion_ros.model.presets import TINY
from bevfusion_ros.pipeline import BEVFusionPipeline, InputError
from bevfusion_ros.ros import convert
from bevfusion_ros.ros.bag import bag_summary, read_bag
from bevfusion_ros.streaming.node_config import configs_from_parameters
from bevfusion_ros.tools import make_bag, make_scene

torch = pytest.importorskip("torch")

from bevfusion_ros.lidar.scn_graph import read_scn_onnx  # noqa: E402
from bevfusion_ros.model.bevfusion import build_model  # noqa: E402
from bevfusion_ros.model.checkpoint import load_checkpoint  # noqa: E402
from bevfusion_ros.model.reference import BEVFusionReference  # noqa: E402
from bevfusion_ros.model.scn_onnx import run_scn_graph  # noqa: E402
from bevfusion_ros.tools import train  # noqa: E402

RIG_FILE = Path(__file__).resolve().parents[2] / "config" / "rigs" / "four-camera.yaml"
SEEDS = (3, 4)
OBJECTS = 12
STAMP_NS = 1_700_000_000_000_000_000
#: The node's names for the rig's four cameras: any names, as many as the model's.
NODE_CAMERAS = ("cam_a", "cam_b", "cam_c", "cam_d")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """make-scene for SEEDS, then two training steps on the same scenes and the export."""
    root = tmp_path_factory.mktemp("four-camera")
    for seed in SEEDS:
        assert make_scene.main(["--seed", str(seed), "--out", str(root / f"scene-{seed}"),
                                "--objects", str(OBJECTS), "--rig", str(RIG_FILE)]) == 0
    out = root / "train"
    assert train.main(["--preset", "tiny", "--rig", str(RIG_FILE), "--scenes", f"{SEEDS[0]}:{SEEDS[-1] + 1}",
                       "--objects", str(OBJECTS), "--epochs", "1", "--precise-bn", "0", "--out", str(out),
                       "--export"]) == 0
    return SimpleNamespace(root=root, checkpoint=out / "model.pt", model_dir=out / "model",
                           log=[json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()])


@pytest.fixture(scope="module")
def pipeline(trained) -> BEVFusionPipeline:
    return BEVFusionPipeline.from_model_dir(trained.model_dir)


@pytest.fixture(scope="module")
def frame(trained, pipeline) -> Frame:
    """The scene folder of SEEDS[0] as the node rebuilds it: the model's img_aug_matrix, and
    camera2lidar as a TF transform carries it (a unit quaternion)."""
    return as_the_node_rebuilds(load_example_data(trained.root / f"scene-{SEEDS[0]}"), pipeline.config.image)


def test_training_ran_on_the_rig_and_exported_its_cameras(trained):
    rig = load_rig(RIG_FILE)
    assert [record["step"] for record in trained.log] == [1, 2]
    assert all(np.isfinite(record["loss"]) for record in trained.log)
    config = load_config(trained.model_dir / "bevfusion.yaml")
    assert config.camera_names == rig.camera_names == ("front", "left", "rear", "right")
    assert (config.image.input_width, config.image.input_height) == (1280, 720)
    assert config.image == TINY.pipeline.image.for_input_size(1280, 720)
    graph = onnx.load(str(trained.model_dir / "camera.backbone.onnx"), load_external_data=False).graph
    shapes = {value.name: [dim.dim_value for dim in value.type.tensor_type.shape.dim]
              for value in (*graph.input, *graph.output)}
    assert shapes["img"] == [1, 4, 3, 128, 256] and shapes["depth"] == [1, 4, 1, 128, 256]
    assert shapes["camera_feature"][0] == 4 and shapes["camera_depth_weights"][0] == 4
    info = yaml.safe_load((trained.model_dir / "export.yaml").read_text())
    assert info["trained"] is True and info["cameras"] == list(rig.camera_names)
    assert info["image_size"] == [1280, 720] and "rig four-camera" in info["trained_on"]


def test_the_pipeline_equals_the_reference_of_the_trained_weights(trained, pipeline, frame,
                                                                 assert_matches_reference):
    preset = TINY.for_rig(load_rig(RIG_FILE))
    model = build_model(preset)
    load_checkpoint(model, trained.checkpoint)
    nodes = read_scn_onnx(trained.model_dir / "lidar.backbone.xyz.onnx")
    shape = preset.pipeline.voxelization.sparse_shape
    reference = BEVFusionReference(model, lambda features, coords: run_scn_graph(nodes, features, coords, shape))
    expected = reference(frame.images, frame.points, frame.calibration).numpy()
    assert_matches_reference(pipeline.forward(frame).boxes, expected)


def test_a_model_refuses_a_rig_of_another_camera_count(trained, pipeline, frame):
    six = TINY.pipeline
    with pytest.raises(EngineInterfaceError, match=r"camera.backbone.onnx was exported for 4 cameras "
                                                   r"\(input 'img' \[1, 4, 3, 128, 256\]\), the configuration "
                                                   r"has 6: \['FRONT'"):
        BEVFusionPipeline.from_model_dir(trained.model_dir, six)
    with pytest.raises(ConfigError, match=r"the parameters name 6 cameras .* was exported for 4 cameras "
                                          r"\['front', 'left', 'rear', 'right'\]"):
        configs_from_parameters({"camera_names": list(six.camera_names)}, pipeline.config)
    calibration = frame.calibration
    three = Frame(frame.images[:3], frame.points, Calibration.from_camera2lidar(
        calibration.camera_intrinsics[:3, :3, :3], calibration.camera2lidar[:3], pipeline.config.image,
        calibration.camera_names[:3]))
    with pytest.raises(InputError, match=r"calibration has 3 cameras, the model expects 4 \(\['front'"):
        pipeline.forward(three)


def test_the_node_on_the_rig_equals_the_pipeline(trained, pipeline, frame, tmp_path):
    """The node takes other names for the four cameras (camera_names) and, without
    node.camera_topics, subscribes /CAM_<name>/image_raw; K from CameraInfo, mounting from TF."""
    calibration = frame.calibration
    renamed = Frame(frame.images, frame.points, Calibration.from_camera2lidar(
        calibration.camera_intrinsics[:, :3, :3], calibration.camera2lidar, pipeline.config.image, NODE_CAMERAS))
    harness = NodeUnderTest(trained.model_dir, tmp_path, "zero_fill", camera_names=NODE_CAMERAS, default_topics=True)
    try:
        assert harness.camera_topics == [f"/CAM_{name}/image_raw" for name in NODE_CAMERAS]
        harness.wait_ready()                     # subscribed on those topics
        harness.publish(renamed, STAMP_NS)
        assert harness.spin_until(lambda: STAMP_NS in harness.detections and STAMP_NS in harness.frame_infos,
                                  FRAME_TIMEOUT_S), "no detections"
        info = harness.frame_infos[STAMP_NS]
        assert tuple(info.cameras_used) == NODE_CAMERAS and list(info.cameras_missing) == []
        assert_same_boxes(harness.detections[STAMP_NS], pipeline.forward(frame))
    finally:
        output = harness.close()
    assert "Traceback" not in output, output


def test_make_bag_writes_the_rigs_topics_and_extrinsics(tmp_path, capsys):
    """``bevfusion-make-bag --seeds --rig --cameras``: per chosen camera its image and CameraInfo
    on the node's default topics, and its mounting on /tf_static."""
    out = tmp_path / "rig.mcap"
    assert make_bag.main(["--seeds", "5:6", "--out", str(out), "--rig", str(RIG_FILE),
                          "--cameras", "rear,front"]) == 0
    assert "messages: 6" in capsys.readouterr().out          # tf_static + 2 x (info, image) + cloud
    topics = bag_summary(out)
    assert {"/CAM_rear/image_raw", "/CAM_front/image_raw", "/CAM_rear/camera_info",
            "/CAM_front/camera_info"} <= set(topics) and not any("left" in topic for topic in topics)
    rig = load_rig(RIG_FILE)
    tf_static = next(iter(read_bag(out, ["/tf_static"]))).message
    mountings = {t.child_frame_id: convert.transform_to_matrix(t.transform) for t in tf_static.transforms}
    assert sorted(mountings) == ["cam_front", "cam_rear"]
    np.testing.assert_allclose(mountings["cam_rear"], rig.camera2lidar()[2], atol=1e-12)
    info = next(iter(read_bag(out, ["/CAM_front/camera_info"]))).message
    assert (info.width, info.height) == (1280, 720) and info.k[0] == 560.0
    assert make_bag.main(["--seeds", "5:6", "--out", str(out), "--rig", str(RIG_FILE), "--cameras", "nose"]) == 1
    assert "error: rig four-camera has no camera(s) ['nose']" in capsys.readouterr().err
