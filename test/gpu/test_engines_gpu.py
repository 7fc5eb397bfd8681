"""PyTorch engine on CUDA: float16 + channels-last + CUDA graphs against ONNX Runtime (CPU,
float32), graphs against eager, CuPy zero-copy I/O on the current CuPy stream, and timings of
nuscenes-r50-sized networks (printed).

float16 tolerance: relative L2 error (||actual - expected|| / ||expected||) below 1e-2 per
output. The head is compared proposal by proposal instead: its TopK over float16 heatmap scores
may order near-equal proposals differently or swap the last one in or out of the top K.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

from bevfusion_ros.engines import DENSE_MODEL_FILES, OnnxRuntimeEngine, load_dense_engines  # noqa: E402
from bevfusion_ros.engines.select import resolve_backend  # noqa: E402
from bevfusion_ros.engines.torch_gpu import TorchEngine  # noqa: E402
from bevfusion_ros.model.export import export_model_set  # noqa: E402
from bevfusion_ros.model.presets import NUSCENES_R50, TINY  # noqa: E402

FLOAT16_RELATIVE_L2 = 1e-2
HEAD = "head.bbox.onnx"
HEAD_OUTPUTS = ("score", "rot", "dim", "reg", "height", "vel")
# A head proposal matches when some proposal of the other run is this close (relative L2 over
# its 20 values, each output scaled by its RMS); at least this share of them must match.
PROPOSAL_TOLERANCE, PROPOSALS_MATCHED = 2e-2, 0.9
# Research-script figures on the H100 (random weights), ms: float16 channels-last CUDA graphs.
REFERENCE_MS = {"camera.backbone.onnx": 2.8, "camera.vtransform.onnx": 0.17, "fuser.onnx": 0.66,
                "head.bbox.onnx": 0.62}
SPIN_KERNEL = r'''
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
'''


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return export_model_set(TINY, "fp16", tmp_path_factory.mktemp("tiny"), seed=5).out_dir


@pytest.fixture(scope="session")
def r50_dir(tmp_path_factory):
    """nuscenes-r50 sized fp16 set (random weights, seed 0): about a minute of CPU time, once.

    ``BEVFUSION_R50_FP16_DIR`` names a folder to reuse (exported there when it is empty), e.g.
    benchmarks/device_run.sh's ``/tmp/r50-fp16``.
    """
    folder = Path(os.environ.get("BEVFUSION_R50_FP16_DIR") or tmp_path_factory.mktemp("r50"))
    if not (folder / "export.yaml").is_file():
        export_model_set(NUSCENES_R50, "fp16", folder, seed=0)
    return folder


def host_feeds(engine, seed):
    rng = np.random.default_rng(seed)
    return {name: np.abs(rng.standard_normal(spec.shape)).astype(np.float32)
            for name, spec in engine.inputs.items()}


def to_host(outputs):
    return {name: (value.get() if isinstance(value, cupy.ndarray) else np.asarray(value)).astype(np.float32)
            for name, value in outputs.items()}


def relative_l2(actual, expected):
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def matched_proposals(actual, expected):
    """Share of ``expected``'s head proposals with a close proposal in ``actual``."""
    scales = {name: float(np.sqrt(np.mean(expected[name] ** 2))) for name in HEAD_OUTPUTS}

    def vectors(outputs):                         # [K, 20]: each output in units of its RMS
        return np.concatenate([outputs[name][0] / scales[name] for name in HEAD_OUTPUTS]).T
    wanted, got = vectors(expected), vectors(actual)
    distance = np.linalg.norm(wanted[:, None, :] - got[None, :, :], axis=2).min(axis=1)
    return float(np.mean(distance <= PROPOSAL_TOLERANCE * np.linalg.norm(wanted, axis=1)))


def assert_float16_close(name, outputs, expected):
    if name == HEAD:
        assert matched_proposals(outputs, expected) >= PROPOSALS_MATCHED
        return
    for key, value in outputs.items():
        assert relative_l2(value, expected[key]) < FLOAT16_RELATIVE_L2, (name, key)


def test_float16_cuda_graphs_match_onnxruntime_float32(tiny_dir):
    for name in DENSE_MODEL_FILES:
        engine = TorchEngine(tiny_dir / name)
        assert engine.backend.endswith(":float16:cudagraph")
        assert all(spec.dtype == np.float16 for spec in (*engine.inputs.values(), *engine.outputs.values()))
        feeds = host_feeds(engine, seed=len(name))
        outputs = engine.run({key: cupy.asarray(value) for key, value in feeds.items()})
        assert all(isinstance(value, cupy.ndarray) and value.dtype == np.float16
                   and value.flags.c_contiguous for value in outputs.values())
        assert_float16_close(name, to_host(outputs), OnnxRuntimeEngine(tiny_dir / name).run(feeds))


def test_float32_on_cuda_matches_onnxruntime_tightly(tiny_dir, monkeypatch):
    """Every op on the GPU in float32 (TF32 off): the head's TopK order must agree too."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for name in DENSE_MODEL_FILES:
        engine = TorchEngine(tiny_dir / name, dtype=torch.float32)
        feeds = host_feeds(engine, seed=2)
        expected = OnnxRuntimeEngine(tiny_dir / name).run(feeds)
        for key, value in to_host(engine.run(feeds)).items():
            np.testing.assert_allclose(value, expected[key], rtol=1e-3,
                                       atol=1e-3 * float(np.abs(expected[key]).max()), err_msg=key)


def test_fused_conv_activations_equal_the_separate_ops(tiny_dir, monkeypatch):
    """cuDNN's conv+bias(+residual)+ReLU calls against the three separate ops, float32 (TF32
    off): they differ only by where the sum is rounded. The backbone and fuser use both forms."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for name in ("camera.backbone.onnx", "fuser.onnx"):
        fused = TorchEngine(tiny_dir / name, dtype=torch.float32)
        separate = TorchEngine(tiny_dir / name, dtype=torch.float32, fuse_conv_activations=False)
        ops = fused.module.runtime_ops
        assert ops["Conv+Relu"] > 0 and "Conv+Relu" not in separate.module.runtime_ops, ops
        if name == "camera.backbone.onnx":
            assert ops["Conv+Add+Relu"] > 0, ops
        feeds = {key: cupy.asarray(value) for key, value in host_feeds(fused, seed=3).items()}
        expected = to_host(separate.run(feeds))
        for key, value in to_host(fused.run(feeds)).items():
            assert relative_l2(value, expected[key]) < 1e-5, (name, key)


def test_graph_replay_equals_eager_execution(tiny_dir):
    for name in DENSE_MODEL_FILES:
        graph, eager = TorchEngine(tiny_dir / name), TorchEngine(tiny_dir / name, cuda_graph=False)
        assert not eager.backend.endswith("cudagraph")
        for seed in (0, 1):                               # a second replay with new feeds
            feeds = {key: cupy.asarray(value) for key, value in host_feeds(graph, seed).items()}
            replayed, executed = to_host(graph.run(feeds)), to_host(eager.run(feeds))
            for key in replayed:
                np.testing.assert_array_equal(replayed[key], executed[key], err_msg=f"{name} {key}")


def test_cupy_outputs_are_views_of_the_graph_outputs(tiny_dir):
    """Documented aliasing: with graphs every run returns the same device memory (zero-copy),
    so an earlier result changes when the engine runs again; without graphs it does not."""
    path = tiny_dir / "camera.vtransform.onnx"
    graph, eager = TorchEngine(path), TorchEngine(path, cuda_graph=False)
    first_feeds, second_feeds = (
        {key: cupy.asarray(value) for key, value in host_feeds(graph, seed).items()} for seed in (0, 1))
    first = graph.run(first_feeds)["feat_out"]
    first_values = first.copy()
    second = graph.run(second_feeds)["feat_out"]
    assert second.data.ptr == first.data.ptr
    cupy.testing.assert_array_equal(first, second)
    assert not cupy.array_equal(first, first_values)
    kept = eager.run(first_feeds)["feat_out"]
    fresh = eager.run(second_feeds)["feat_out"]
    assert fresh.data.ptr != kept.data.ptr
    cupy.testing.assert_array_equal(kept, first_values)


@pytest.mark.parametrize("cuda_graph", [True, False])
def test_runs_in_order_on_the_current_cupy_stream(tiny_dir, cuda_graph):
    """On a non-blocking CuPy stream a spinning kernel delays the write of the feed: the result
    is right only if the engine reads its input and writes its output on that stream."""
    path = tiny_dir / "camera.vtransform.onnx"
    engine = TorchEngine(path, cuda_graph=cuda_graph)
    feeds = host_feeds(engine, seed=3)
    source = cupy.asarray(feeds["feat_in"])
    target = cupy.zeros_like(source)
    cupy.cuda.Device().synchronize()
    spin = cupy.RawKernel(SPIN_KERNEL, "spin")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        spin((1,), (1,), (np.int64(400_000_000),))      # ~0.2 s at 2 GHz
        target[...] = source
        result = engine.run({"feat_in": target})["feat_out"].copy()
    stream.synchronize()
    expected = OnnxRuntimeEngine(path).run(feeds)["feat_out"]
    assert relative_l2(result.get().astype(np.float32), expected) < FLOAT16_RELATIVE_L2


def test_torch_and_numpy_feeds_give_their_own_kind(tiny_dir):
    engine = TorchEngine(tiny_dir / "fuser.onnx")
    feeds = host_feeds(engine, seed=4)
    on_host = engine.run(feeds)
    assert all(isinstance(value, np.ndarray) and value.dtype == np.float16 for value in on_host.values())
    on_device = engine.run({key: torch.from_numpy(value).cuda() for key, value in feeds.items()})
    assert all(isinstance(value, torch.Tensor) and value.is_cuda for value in on_device.values())
    np.testing.assert_array_equal(on_device["middle"].cpu().numpy(), on_host["middle"])


def test_gpu_backend_loads_the_folder_and_auto_picks_it(tiny_dir):
    engines = load_dense_engines(tiny_dir, TINY.pipeline, backend="gpu")
    assert all(isinstance(engine, TorchEngine) for engine in engines.values())
    assert resolve_backend("auto") in ("gpu", "tensorrt")


def time_runs(engine, feeds, iterations=100, warmup=20):
    """Mean milliseconds per run on the current stream, from CUDA events."""
    for _ in range(warmup):
        engine.run(feeds)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        engine.run(feeds)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iterations


def test_nuscenes_r50_timings(r50_dir, capsys):
    """Prints ms per network: float16 channels-last CUDA graphs and float32 eager."""
    rows, totals = [], {"graph16": 0.0, "eager32": 0.0}
    for name in DENSE_MODEL_FILES:
        fast = TorchEngine(r50_dir / name)
        slow = TorchEngine(r50_dir / name, dtype=torch.float32, cuda_graph=False, channels_last=False)
        feeds = {key: torch.from_numpy(value).cuda() for key, value in host_feeds(fast, seed=0).items()}
        outputs = fast.run(feeds)
        assert all(bool(torch.isfinite(value).all()) for value in outputs.values()), name
        timings = {"graph16": time_runs(fast, feeds), "eager32": time_runs(slow, feeds, iterations=20)}
        for key, value in timings.items():
            totals[key] += value
        rows.append(f"{name:<24} {timings['graph16']:8.3f} {timings['eager32']:9.3f} "
                    f"{REFERENCE_MS[name]:10.2f}")
        del fast, slow
        torch.cuda.empty_cache()
    with capsys.disabled():
        print(f"\nnuscenes-r50 on {torch.cuda.get_device_name()}, ms per run:")
        print(f"{'network':<24} {'fp16 graph':>8} {'fp32 eager':>9} {'reference':>10}")
        print("\n".join(rows))
        print(f"{'total':<24} {totals['graph16']:8.3f} {totals['eager32']:9.3f} "
              f"{sum(REFERENCE_MS.values()):10.2f}   (reference eager fp32: 19.4)")
    assert totals["graph16"] < totals["eager32"]
