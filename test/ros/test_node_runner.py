"""Generated scenes through a bag and ``bevfusion_node``: what the node publishes equals what the
deploy pipeline computes in-process on the same scenes, box for box and in mAP; the demo runs on
the shipped trained weights.

References: the scenes themselves (:func:`generate_scene`, their arrays and ground truth), the
CPU pipeline called directly, and the nuScenes devkit's metric code (``evaluation.evaluate``).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bevfusion_ros.config import load_config
from bevfusion_ros.pipeline import BEVFusionPipeline
from bevfusion_ros.ros.bag import bag_summary, read_bag
from bevfusion_ros.ros.node_runner import replay_through_node
from bevfusion_ros.sim.scene import generate_scene
from bevfusion_ros.tools import demo
from bevfusion_ros.tools import eval as eval_tool
from bevfusion_ros.tools.make_bag import SCENE_PERIOD_NS, scene_stamp_ns, write_frames_bag

pytest.importorskip("nuscenes.eval.detection.algo")
SEEDS = (100_000, 100_001)
MODEL = demo.TRAINED_MODEL


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def scenes_bag(scenes, tmp_path_factory):
    path = tmp_path_factory.mktemp("bag") / "scenes.mcap"
    write_frames_bag((scene.to_frame() for scene in scenes), path)
    return path


def test_a_scenes_bag_holds_the_scenes_exactly(scenes, scenes_bag):
    summary = bag_summary(scenes_bag)
    assert summary["/LIDAR_TOP"][1] == len(scenes) and summary["/tf_static"][1] == 1
    clouds = [m for m in read_bag(scenes_bag, ["/LIDAR_TOP"])]
    assert [m.log_time_ns for m in clouds] == [scene_stamp_ns(i) for i in range(len(scenes))]
    assert clouds[1].log_time_ns - clouds[0].log_time_ns == SCENE_PERIOD_NS
    for scene, cloud in zip(scenes, clouds):
        message = cloud.message
        assert [f.name for f in message.fields] == ["x", "y", "z", "intensity", "time_lag"]
        assert [f.offset for f in message.fields] == [0, 4, 8, 12, 16] and message.point_step == 20
        points = np.frombuffer(bytes(message.data), np.float32).reshape(-1, 5)
        np.testing.assert_array_equal(points, scene.points)
    images = [m.message for m in read_bag(scenes_bag, ["/CAM_BACK/image_raw"])]
    back = scenes[0].calibration.camera_names.index("BACK")
    for scene, image in zip(scenes, images):
        assert image.encoding == "rgb8"
        rgb = np.frombuffer(bytes(image.data), np.uint8).reshape(image.height, image.width, 3)
        np.testing.assert_array_equal(rgb, scene.images[back])


def test_a_compressed_scenes_bag_holds_jpegs_of_the_images(scenes, tmp_path):
    import cv2
    path = tmp_path / "compressed.mcap"
    write_frames_bag([scenes[0].to_frame()], path, compressed=True)
    assert "/CAM_BACK/image_raw" not in bag_summary(path)
    (message,) = [m.message for m in read_bag(path, ["/CAM_BACK/image_raw/compressed"])]
    assert message.format == "jpeg"
    bgr = cv2.imdecode(np.frombuffer(bytes(message.data), np.uint8), cv2.IMREAD_COLOR)
    rgb = scenes[0].images[scenes[0].calibration.camera_names.index("BACK")]
    assert np.abs(bgr[..., ::-1].astype(int) - rgb).mean() < 2.0          # JPEG quality 95


def test_the_node_publishes_the_pipelines_boxes(scenes, scenes_bag, ros_env, tmp_path):
    replay = replay_through_node(MODEL, scenes_bag, tmp_path, "cpu", score_threshold=0.0,
                                 domain_id=ros_env.domain_id)
    assert replay.frames == len(scenes) and sorted(replay.detections) == \
        [scene_stamp_ns(i) for i in range(len(scenes))]
    config = load_config(MODEL / "bevfusion.yaml")
    config = dataclasses.replace(config, head=dataclasses.replace(config.head, score_threshold=0.0))
    pipeline = BEVFusionPipeline.from_model_dir(MODEL, config, backend="cpu")
    for index, scene in enumerate(scenes):
        expected = pipeline.forward(eval_tool.for_model(scene.to_frame(), config))
        published = replay.detections[scene_stamp_ns(index)]
        assert len(published) == len(expected) == config.head.num_proposals
        np.testing.assert_array_equal(published.labels, expected.labels)
        np.testing.assert_allclose(published.boxes[:, :6], expected.boxes[:, :6], atol=2e-3)
        np.testing.assert_allclose(published.scores, expected.scores, atol=1e-4)
        turn = np.angle(np.exp(1j * (published.boxes[:, 6] - expected.boxes[:, 6])))
        assert np.abs(turn).max() < 1e-3


def test_eval_through_the_node_gives_the_direct_map(tmp_path, ros_env):
    common = ["--model", str(MODEL), "--seeds", f"{SEEDS[0]}:{SEEDS[-1] + 1}", "--backend", "cpu"]
    assert eval_tool.main(common + ["--json", str(tmp_path / "direct.json")]) == 0
    assert eval_tool.main(common + ["--through-node", "--node-out", str(tmp_path / "node"),
                                    "--json", str(tmp_path / "node.json")]) == 0
    direct, node = (json.loads((tmp_path / name).read_text())["metrics"] for name in ("direct.json", "node.json"))
    assert direct["mean_ap"] > 0.6                   # the shipped weights detect
    assert node["mean_ap"] == pytest.approx(direct["mean_ap"], abs=1e-3)
    assert node["class_mean_ap"] == pytest.approx(direct["class_mean_ap"], abs=1e-3)


def test_the_demo_runs_the_trained_model_through_the_node(tmp_path, ros_env, capsys):
    assert demo.main(["--seeds", f"{SEEDS[0]}:{SEEDS[-1] + 1}", "--backend", "cpu",
                      "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not nuScenes" in out and "answered: 2 Detection3DArray" in out
    line = next(line for line in out.splitlines() if "through the node on 2 generated scenes" in line)
    assert float(line.split("mAP ")[1].split()[0]) > 0.6
    for name in ("detections.mcap", "detections.json", "visualization.png", "node.log"):
        assert (tmp_path / name).is_file()


def test_make_bag_cli_writes_generated_scenes(tmp_path, capsys):
    from bevfusion_ros.tools.make_bag import main
    out = tmp_path / "one.mcap"
    assert main(["--seeds", f"{SEEDS[0]}:{SEEDS[0] + 1}", "--out", str(out)]) == 0
    assert bag_summary(out)["/LIDAR_TOP"][1] == 1
    assert "messages: 14" in capsys.readouterr().out          # tf_static + 6 x (info, image) + cloud
    for wrong in ([], ["somewhere", "--seeds", "1:2"]):
        with pytest.raises(SystemExit) as exit_info:
            main(wrong + ["--out", str(out)])
        assert exit_info.value.code == 2
