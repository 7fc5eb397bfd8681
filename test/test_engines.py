"""Engine interface + ONNX Runtime backend on exported tiny model sets (fp16 and int8 Q/DQ)."""
from __future__ import annotations

import numpy as np
import pytest

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")                       # only to export the model sets

from bevfusion_ros.engines import (  # noqa: E402
    DENSE_MODEL_FILES,
    EngineError,
    EngineInterfaceError,
    OnnxRuntimeEngine,
    check_interface,
    expected_interfaces,
    load_dense_engines,
)
from bevfusion_ros.model.export import export_model_set  # noqa: E402
from bevfusion_ros.model.presets import NUSCENES_R50, TINY  # noqa: E402

# Spec 2.2-2.5 for CUDA-BEVFusion's resnet50 model, written out by hand from the tables.
NUSCENES_R50_INTERFACES = {
    "camera.backbone.onnx": ({"img": (1, 6, 3, 256, 704), "depth": (1, 6, 1, 256, 704)},
                             {"camera_feature": (6, 32, 88, 80),
                              "camera_depth_weights": (6, 118, 32, 88)}),
    "camera.vtransform.onnx": ({"feat_in": (1, 80, 360, 360)}, {"feat_out": (1, 80, 180, 180)}),
    "fuser.onnx": ({"camera": (1, 80, 180, 180), "lidar": (1, 256, 180, 180)},
                   {"middle": (1, None, 180, 180)}),
    "head.bbox.onnx": ({"middle": (1, None, 180, 180)},
                       {"score": (1, 10, 200), "rot": (1, 2, 200), "dim": (1, 3, 200),
                        "reg": (1, 2, 200), "height": (1, 1, 200), "vel": (1, 2, 200)}),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {precision: export_model_set(TINY, precision, root / precision, seed=1).out_dir
            for precision in ("fp16", "int8")}


def random_feeds(engine, seed):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(spec.shape).astype(np.float32)
            for name, spec in engine.inputs.items()}


def test_expected_interfaces_of_nuscenes_r50_match_the_spec_tables():
    assert expected_interfaces(NUSCENES_R50.pipeline, lidar_bev_channels=256) == NUSCENES_R50_INTERFACES
    assert list(expected_interfaces(NUSCENES_R50.pipeline)) == list(DENSE_MODEL_FILES)
    assert expected_interfaces(NUSCENES_R50.pipeline)["fuser.onnx"][0]["lidar"] == (1, None, 180, 180)


def test_tiny_sets_load_and_fit_the_tiny_config(model_dirs):
    for model_dir in model_dirs.values():
        engines = load_dense_engines(model_dir, TINY.pipeline)
        assert list(engines) == list(DENSE_MODEL_FILES)
        interfaces = expected_interfaces(TINY.pipeline, lidar_bev_channels=TINY.lidar_bev_channels)
        for name, engine in engines.items():
            assert engine.name == name and engine.backend == "onnxruntime:CPUExecutionProvider"
            check_interface(engine, *interfaces[name])
        assert list(engines["head.bbox.onnx"].outputs) == ["score", "rot", "dim", "reg", "height", "vel"]


def test_interface_mismatch_names_tensor_and_both_shapes(model_dirs):
    engine = OnnxRuntimeEngine(model_dirs["fp16"] / "camera.backbone.onnx")
    with pytest.raises(EngineInterfaceError) as caught:
        check_interface(engine, *expected_interfaces(NUSCENES_R50.pipeline)["camera.backbone.onnx"])
    assert caught.value.problems == [
        "camera.backbone.onnx: input 'img' has shape [1, 6, 3, 128, 256], expected [1, 6, 3, 256, 704]",
        "camera.backbone.onnx: input 'depth' has shape [1, 6, 1, 128, 256], expected [1, 6, 1, 256, 704]",
        "camera.backbone.onnx: output 'camera_feature' has shape [6, 16, 32, 20], expected [6, 32, 88, 80]",
        "camera.backbone.onnx: output 'camera_depth_weights' has shape [6, 30, 16, 32], "
        "expected [6, 118, 32, 88]",
    ]
    with pytest.raises(EngineInterfaceError, match=r"input 'img' has shape \[1, 6, 3, 128, 256\]"):
        load_dense_engines(model_dirs["fp16"], NUSCENES_R50.pipeline)


def test_interface_reports_missing_unexpected_and_lidar_channels(model_dirs):
    fuser = OnnxRuntimeEngine(model_dirs["fp16"] / "fuser.onnx")
    inputs, outputs = expected_interfaces(TINY.pipeline, lidar_bev_channels=128)["fuser.onnx"]
    with pytest.raises(EngineInterfaceError) as caught:
        check_interface(fuser, inputs, {"fused": outputs["middle"]})
    assert caught.value.problems == [
        "fuser.onnx: input 'lidar' has shape [1, 64, 36, 36], expected [1, 128, 36, 36]",
        "fuser.onnx: missing output 'fused' (expected [1, *, 36, 36])",
        "fuser.onnx: unexpected output 'middle' [1, 64, 36, 36]",
    ]


def test_outputs_equal_an_independent_session_for_float32_and_float16_feeds(model_dirs):
    for model_dir in model_dirs.values():
        for name, engine in load_dense_engines(model_dir, TINY.pipeline).items():
            feeds = random_feeds(engine, seed=len(name))
            session = onnxruntime.InferenceSession(str(model_dir / name),
                                                   providers=["CPUExecutionProvider"])
            expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            outputs = engine.run(feeds)
            assert list(outputs) == list(engine.outputs)
            for key, value in outputs.items():
                assert value.dtype == np.float32 and value.shape == engine.outputs[key].shape
                np.testing.assert_array_equal(value, expected[key])
            half = {key: value.astype(np.float16) for key, value in feeds.items()}
            widened = session.run(None, {key: value.astype(np.float32) for key, value in half.items()})
            for value, reference in zip(engine.run(half).values(), widened):
                np.testing.assert_array_equal(value, reference)


def test_bad_feeds_raise_engine_errors(model_dirs):
    head = OnnxRuntimeEngine(model_dirs["fp16"] / "head.bbox.onnx", threads=1)
    with pytest.raises(EngineError, match=r"head.bbox.onnx: feed 'middle' has shape \[1, 64, 36, 35\], "
                                          r"expected \[1, 64, 36, 36\]"):
        head.run({"middle": np.zeros((1, 64, 36, 35), np.float32)})
    with pytest.raises(EngineError, match=r"unknown \['bev'\], missing \['middle'\]"):
        head.run({"bev": np.zeros((1, 64, 36, 36), np.float32)})


def test_missing_corrupt_files_and_unknown_backend(model_dirs, tmp_path):
    missing = tmp_path / "head.bbox.onnx"
    with pytest.raises(EngineError, match=f"model file not found: {missing}"):
        OnnxRuntimeEngine(missing)
    missing.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(EngineError, match=f"cannot load model file {missing}"):
        OnnxRuntimeEngine(missing)
    with pytest.raises(EngineError, match=f"model file not found: {tmp_path / 'camera.backbone.onnx'}"):
        load_dense_engines(tmp_path, TINY.pipeline)
    with pytest.raises(EngineError, match=r"unknown engine backend 'tpu'; known: \['auto', 'tensorrt', 'gpu', 'cpu'\]"):
        load_dense_engines(model_dirs["fp16"], TINY.pipeline, backend="tpu")
