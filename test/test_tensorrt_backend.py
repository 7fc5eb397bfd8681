"""TensorRT backend without TensorRT: plan cache and keys, build settings, the error when
TensorRT is missing, backend selection, and the strict mypy check against tensorrt-stubs.

TensorRT cannot be installed on these machines (nor on the GPU test machine), so the builder
calls are checked against ``MockTensorRT`` below: a MOCK of the ``tensorrt`` module that only
records what the build configures. It is the only mock in this file.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from bevfusion_ros.engines import EngineError, PlanCache, TensorRTEngine, load_dense_engines
from bevfusion_ros.engines.plan_cache import sha256_hex
from bevfusion_ros.engines.select import UnknownBackendError, choose_backend, resolve_backend
from bevfusion_ros.engines.tensorrt import BuildSettings, GpuIdentity, build_settings, cached_plan, tensorrt_version
from bevfusion_ros.model.presets import TINY

REPO_ROOT = Path(__file__).resolve().parents[1]
STUBS = REPO_ROOT / "build" / "typecheck-stubs"
KEY_FIELDS = dict(onnx_bytes_sha256="ab" * 32, tensorrt_version="10.13.0.35", gpu_name="NVIDIA H100",
                  compute_capability="9.0", precision="fp16", flags=("FP16", "io=fp16:chw"))
GPU = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")


def tensorrt_installed() -> bool:
    try:
        tensorrt_version()
    except EngineError:
        return False
    return True


# ------------------------------------------------------------------------------ plan cache

def test_key_names_a_file_that_changes_with_every_field(tmp_path):
    cache = PlanCache(tmp_path)
    key = cache.key(**KEY_FIELDS)
    assert key.file_name.endswith(".plan") and key == cache.key(**KEY_FIELDS)
    assert cache.key(**{**KEY_FIELDS, "flags": ("io=fp16:chw", "FP16")}) == key   # order-free
    changed = {"onnx_bytes_sha256": "cd" * 32, "tensorrt_version": "10.14.1",
               "gpu_name": "NVIDIA H200", "compute_capability": "8.9", "precision": "int8",
               "flags": ("FP16", "INT8", "io=fp16:chw")}
    names = {cache.key(**{**KEY_FIELDS, field: value}).file_name for field, value in changed.items()}
    assert len(names) == len(changed) and key.file_name not in names


def test_store_then_load_round_trips_with_a_sidecar(tmp_path):
    cache = PlanCache(tmp_path / "plans")
    key = cache.key(**KEY_FIELDS)
    assert cache.load(key) is None
    path = cache.store(key, b"plan bytes", source="/models/head.bbox.onnx")
    assert path == tmp_path / "plans" / key.file_name and path.read_bytes() == b"plan bytes"
    record = json.loads(path.with_suffix(".json").read_text())
    assert record == {"key": {**{name: value for name, value in KEY_FIELDS.items()
                                 if name != "onnx_bytes_sha256"},
                              "onnx_sha256": KEY_FIELDS["onnx_bytes_sha256"],
                              "flags": ["FP16", "io=fp16:chw"]},
                      "plan_sha256": sha256_hex(b"plan bytes"), "plan_bytes": 10,
                      "source": "/models/head.bbox.onnx"}
    assert cache.load(key) == b"plan bytes"
    cache.store(key, b"rebuilt")
    assert cache.load(key) == b"rebuilt"
    assert sorted(item.name for item in path.parent.iterdir()) == sorted(
        [key.file_name, path.with_suffix(".json").name])                  # no temporary left


def test_load_rejects_plans_the_sidecar_does_not_vouch_for(tmp_path, caplog):
    cache = PlanCache(tmp_path)
    key = cache.key(**KEY_FIELDS)
    path = cache.store(key, b"plan")
    path.write_bytes(b"plan, truncated or overwritten")
    assert cache.load(key) is None
    cache.store(key, b"plan")
    sidecar = path.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    record["key"]["gpu_name"] = "another GPU"
    sidecar.write_text(json.dumps(record))
    assert cache.load(key) is None
    sidecar.write_text("{not json")
    assert cache.load(key) is None
    sidecar.unlink()
    assert cache.load(key) is None
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING] == [
        f"ignoring plan {path}: its sha256 differs from the sidecar's",
        f"ignoring plan {path}: its sidecar records another key",
        f"ignoring unreadable plan sidecar {sidecar}: Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1)"]


def test_timing_cache_is_per_tensorrt_version_and_gpu(tmp_path):
    cache = PlanCache(tmp_path)
    path = cache.timing_cache_path("10.13.0.35", "NVIDIA H100", "9.0")
    assert path.parent == tmp_path and path.suffix == ".cache"
    assert path == cache.timing_cache_path("10.13.0.35", "NVIDIA H100", "9.0")
    assert path != cache.timing_cache_path("10.14.1", "NVIDIA H100", "9.0")
    assert path != cache.timing_cache_path("10.13.0.35", "NVIDIA H200", "9.0")


# ------------------------------------------------------------------------------ build settings

def conv_graph(tmp_path, quantized: bool) -> Path:
    """A 1-conv graph, optionally with NVIDIA-style Q/DQ on the activation and the weight."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 1, 1], [1.0, 2.0])
    conv_input, conv_weight = ("xdq", "wdq") if quantized else ("x", "w")
    nodes = [helper.make_node("Conv", [conv_input, conv_weight], ["y"])]
    initializers = [weight]
    if quantized:
        nodes[:0] = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                     helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xdq"]),
                     helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"]),
                     helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wdq"])]
        initializers += [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                         helper.make_tensor("z", TensorProto.INT8, [], [0])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
                              initializer=initializers)
    path = tmp_path / ("int8.onnx" if quantized else "fp16.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_int8_only_for_files_with_qdq(tmp_path):
    plain, quantized = conv_graph(tmp_path, False).read_bytes(), conv_graph(tmp_path, True).read_bytes()
    assert build_settings("a.onnx", plain, "auto") == BuildSettings(int8=False)
    assert build_settings("a.onnx", quantized, "auto") == BuildSettings(int8=True)
    assert BuildSettings(int8=False).flags() == ("FP16", "io=fp16:chw", "workspace_mib=2048")
    assert BuildSettings(int8=True, workspace_mib=512).flags() == (
        "FP16", "INT8", "io=fp16:chw", "workspace_mib=512")
    assert build_settings("a.onnx", quantized, "int8").precision == "int8"
    with pytest.raises(EngineError, match="a.onnx: int8 needs Q/DQ nodes and this file has none"):
        build_settings("a.onnx", plain, "int8")
    with pytest.raises(EngineError, match="a.onnx: this file carries Q/DQ nodes"):
        build_settings("a.onnx", quantized, "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        build_settings("a.onnx", plain, "fp32")


# ------------------------------------------------------------------------------ without TensorRT

@pytest.mark.skipif(tensorrt_installed(), reason="TensorRT is installed here")
def test_engine_without_tensorrt_raises_a_clear_error(tmp_path):
    path = conv_graph(tmp_path, False)
    with pytest.raises(EngineError, match=r"TensorRT is not installed \(No module named 'tensorrt'\)"):
        TensorRTEngine(path, cache=PlanCache(tmp_path / "plans"))
    with pytest.raises(EngineError, match="engine backend 'tensorrt' cannot run here: TensorRT is not installed"):
        load_dense_engines(tmp_path, TINY.pipeline, backend="tensorrt")
    assert not (tmp_path / "plans").exists()


def test_type_stubs_alone_are_not_tensorrt(tmp_path, monkeypatch):
    """tensorrt-stubs installs a ``tensorrt`` folder holding only ``__init__.pyi``: Python
    imports it as an empty namespace package, which must not pass for TensorRT."""
    (tmp_path / "stubs" / "tensorrt").mkdir(parents=True)
    (tmp_path / "stubs" / "tensorrt" / "__init__.pyi").write_text("__version__: str\n")
    monkeypatch.syspath_prepend(str(tmp_path / "stubs"))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    with pytest.raises(EngineError, match=r"TensorRT is not installed: 'tensorrt' at .* has no Builder"):
        TensorRTEngine(conv_graph(tmp_path, False), cache=PlanCache(tmp_path / "plans"))


# ------------------------------------------------------------------------------ MOCK TensorRT

class MockTensorRT(types.ModuleType):
    """MOCK of the ``tensorrt`` module (TensorRT cannot be installed here): just enough of the
    builder API for :func:`cached_plan`. The "plan" it builds is a JSON record of what the
    build configured; each build counts in ``builds``."""

    __version__ = "10.13.0.mock"
    float32, float16 = "float32", "float16"
    MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    TensorFormat = types.SimpleNamespace(LINEAR=0)

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            self.severity = severity

    def __init__(self) -> None:
        super().__init__("tensorrt")
        self.builds = 0
        mock = self

        class Tensor:
            def __init__(self, name):
                self.name, self.dtype, self.allowed_formats = name, mock.float32, None

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs, self.outputs = flags, [], []
                self.num_inputs = self.num_outputs = 0

            def get_input(self, index):
                return self.inputs[index]

            def get_output(self, index):
                return self.outputs[index]

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse(self, data, path):
                graph = onnx.load_model_from_string(data).graph
                self.network.inputs = [Tensor(value.name) for value in graph.input]
                self.network.outputs = [Tensor(value.name) for value in graph.output]
                self.network.num_inputs, self.network.num_outputs = len(graph.input), len(graph.output)
                self.network.path = path
                return True

        class TimingCache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+timing"

        class Config:
            def __init__(self):
                self.flags, self.pools, self.timing = [], {}, None

            def set_memory_pool_limit(self, pool, size):
                self.pools[pool] = size

            def set_flag(self, flag):
                self.flags.append(flag)

            def create_timing_cache(self, data):
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.timing = cache
                return True

            def get_timing_cache(self):
                return self.timing

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def build_serialized_network(self, network, config):
                mock.builds += 1
                return json.dumps({
                    "network_flags": network.flags, "path": network.path, "flags": config.flags,
                    "pools": config.pools, "timing_cache_in": config.timing.data.decode(),
                    "io": {tensor.name: [tensor.dtype, tensor.allowed_formats]
                           for tensor in network.inputs + network.outputs}}).encode()

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.fixture
def mock_tensorrt(monkeypatch):
    mock = MockTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", mock)
    return mock


def test_build_configures_like_nvidia_and_caches_plan_and_timing(mock_tensorrt, tmp_path):
    cache = PlanCache(tmp_path / "plans")
    records = {}
    for quantized in (False, True):
        path = conv_graph(tmp_path, quantized)
        data = path.read_bytes()
        settings = build_settings(path.name, data, "auto")
        plan, key = cached_plan(path, data, settings, cache, GPU)
        records[quantized] = json.loads(plan)
        assert key == cache.key(sha256_hex(data), "10.13.0.mock", GPU.name, "9.0",
                                settings.precision, settings.flags())
        assert cache.load(key) == plan
    assert mock_tensorrt.builds == 2
    plain, quantized = records[False], records[True]
    assert plain["flags"] == ["FP16"] and quantized["flags"] == ["FP16", "INT8"]
    assert plain["network_flags"] == 0 and plain["pools"] == {"WORKSPACE": 2048 << 20}
    assert plain["io"] == {"x": ["float16", 1], "y": ["float16", 1]}        # fp16, linear only
    assert plain["path"] == str(tmp_path / "fp16.onnx")
    # The timing cache: empty for the first build, saved, then loaded by the second one.
    assert plain["timing_cache_in"] == "" and quantized["timing_cache_in"] == "+timing"
    timing = cache.timing_cache_path("10.13.0.mock", GPU.name, GPU.compute_capability)
    assert timing.read_bytes() == b"+timing+timing"


def test_cached_plan_builds_only_on_a_miss(mock_tensorrt, tmp_path):
    cache = PlanCache(tmp_path / "plans")
    path = conv_graph(tmp_path, False)
    data = path.read_bytes()
    settings = build_settings(path.name, data, "auto")
    first, key = cached_plan(path, data, settings, cache, GPU)
    again, same_key = cached_plan(path, data, settings, cache, GPU)
    assert (again, same_key, mock_tensorrt.builds) == (first, key, 1)
    _, other_gpu = cached_plan(path, data, settings, cache, GpuIdentity("NVIDIA H200", "9.0"))
    _, other_workspace = cached_plan(path, data, BuildSettings(False, 1024), cache, GPU)
    assert mock_tensorrt.builds == 3 and len({key, other_gpu, other_workspace}) == 3
    cached_plan(path, data, settings, cache, GPU, use_timing_cache=False)
    assert mock_tensorrt.builds == 3


# ------------------------------------------------------------------------------ backend selection

def test_auto_prefers_tensorrt_then_gpu_then_cpu():
    def problems(**reasons):
        return lambda backend: reasons.get(backend)

    assert choose_backend("auto", problems()) == ("tensorrt", "tensorrt is available")
    assert choose_backend("auto", problems(tensorrt="not installed")) == (
        "gpu", "gpu is available (tensorrt: not installed)")
    assert choose_backend("auto", problems(tensorrt="not installed", gpu="no GPU")) == (
        "cpu", "no GPU backend can run (tensorrt: not installed; gpu: no GPU)")
    assert choose_backend("gpu", problems(tensorrt="not installed")) == ("gpu", "requested")
    assert choose_backend("cpu", problems(tensorrt="x", gpu="y")) == ("cpu", "requested")
    with pytest.raises(EngineError, match="engine backend 'gpu' cannot run here: no GPU"):
        choose_backend("gpu", problems(gpu="no GPU"))


def test_unknown_backend_is_a_value_error_listing_the_choices():
    with pytest.raises(ValueError, match=r"unknown engine backend 'tpu'; known: "
                                         r"\['auto', 'tensorrt', 'gpu', 'cpu'\]") as caught:
        resolve_backend("tpu")
    assert isinstance(caught.value, EngineError) and isinstance(caught.value, UnknownBackendError)


@pytest.mark.skipif(tensorrt_installed(), reason="TensorRT is installed here")
def test_auto_resolves_here_and_logs_why(caplog):
    caplog.set_level(logging.INFO, logger="bevfusion_ros.engines.select")
    expected = "gpu" if importlib.util.find_spec("torch") and _torch_has_cuda() else "cpu"
    assert resolve_backend("auto") == expected
    [message] = [record.getMessage() for record in caplog.records]
    assert message.startswith(f"engine backend {expected} (requested auto): ")
    assert "tensorrt: TensorRT is not installed" in message


def _torch_has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# ------------------------------------------------------------------------------ type check

def test_tensorrt_backend_type_checks_strictly_against_the_stubs():
    # Not skipped when missing: this check is an acceptance point of CI (scripts/setup.sh installs both).
    assert importlib.util.find_spec("mypy") is not None, "mypy is not installed (pip install -e .[dev])"
    assert (STUBS / "tensorrt" / "__init__.pyi").is_file(), (
        f"tensorrt-stubs are not installed in {STUBS}: run scripts/setup.sh (see requirements/typecheck.txt)")
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy-tensorrt.ini"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr
                                    + "\n(stubs installed and repaired by scripts/setup.sh?)")
    assert "Success: no issues found in 2 source files" in result.stdout
