"""bevfusion-infer on the example frame with a tiny export: outputs and error exit codes."""
from __future__ import annotations

import json

import cv2
import pytest

pytest.importorskip("torch")

from bevfusion_ros.model.export import export_model_set  # noqa: E402
from bevfusion_ros.model.presets import TINY  # noqa: E402
from bevfusion_ros.tools.infer import main  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_model_set(TINY, "fp16", tmp_path_factory.mktemp("tiny"), seed=2).out_dir


def test_writes_json_png_and_timings(model_dir, example_data_dir, tmp_path, capsys):
    assert main(["--model", str(model_dir), "--data", str(example_data_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    boxes = json.loads((tmp_path / "detections.json").read_text())["boxes"]
    assert f"{len(boxes)} boxes" in out and "UNTRAINED" in out
    for stage in ("normalize", "camera_backbone", "bevpool", "lidar_backbone", "head", "total"):
        assert stage in out
    assert {"label", "score", "center", "size", "yaw", "velocity"} <= set(boxes[0])
    image = cv2.imread(str(tmp_path / "visualization.png"))
    assert image is not None and image.shape[1] > image.shape[0] > 200


def test_errors_exit_1_with_a_message(model_dir, example_data_dir, tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--data", str(example_data_dir)]) == 1
    assert "lacks: camera.backbone.onnx" in capsys.readouterr().err
    assert main(["--model", str(model_dir), "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
