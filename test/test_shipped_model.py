"""The committed trained model set (models/tiny-synthetic): intact, labelled as trained on
generated scenes, and detecting on held-out generated scenes through the CPU pipeline (the
metric is nuscenes-devkit's: evaluation.evaluate)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from bevfusion_ros.model.export import MODEL_FILES
from bevfusion_ros.pipeline import model_info, weights_note

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-synthetic"


def test_the_files_are_the_ones_export_yaml_lists():
    info = yaml.safe_load((MODEL / "export.yaml").read_text())
    assert info["preset"] == "tiny" and info["trained"] is True
    for name in MODEL_FILES:
        data = (MODEL / name).read_bytes()
        assert info["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    total = sum((MODEL / name).stat().st_size for name in MODEL_FILES)
    assert total < 3 * 2**20                       # small enough to commit


def test_outputs_say_what_the_weights_were_trained_on():
    note = weights_note(model_info(MODEL))
    assert "generated" in note and "not nuScenes" in note
    assert weights_note({"trained": False}).startswith("UNTRAINED")
    assert weights_note({}) == ""


def test_the_checkpoint_exports_to_the_same_weights(tmp_path):
    """checkpoint.pt is the source of the ONNX files: exported again (this torch version may
    serialise differently), every initializer of every file is the same."""
    import onnx
    from onnx import numpy_helper

    from bevfusion_ros.model.export import export_model_set
    from bevfusion_ros.model.presets import get_preset
    export_model_set(get_preset("tiny"), "fp16", tmp_path, checkpoint=MODEL / "checkpoint.pt")
    for name in MODEL_FILES:
        shipped, again = (onnx.load(str(folder / name)) for folder in (MODEL, tmp_path))
        weights = [{init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
                   for model in (shipped, again)]
        assert weights[0].keys() == weights[1].keys()
        for key, value in weights[0].items():
            np.testing.assert_allclose(weights[1][key], value, rtol=1e-3, atol=1e-6, err_msg=f"{name}:{key}")


def test_it_detects_on_held_out_generated_scenes(tmp_path):
    pytest.importorskip("nuscenes.eval.detection.algo")
    from bevfusion_ros.tools import eval as eval_tool
    out = tmp_path / "eval.json"
    assert eval_tool.main(["--model", str(MODEL), "--seeds", "100100:100104", "--backend", "cpu",
                           "--json", str(out)]) == 0
    import json
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["class_mean_ap"]["car"] > 0.6 and metrics["mean_ap"] > 0.6
