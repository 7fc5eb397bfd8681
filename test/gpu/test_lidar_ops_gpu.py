"""CuPy lidar ops (voxelize, rulebooks, sparse conv, SCN runner) against their NumPy versions.

Exact: voxels (voxelize_cuda's kernels: coords, order, counts, drop counters and the fp16 feature
bits, from the same IEEE float32 arithmetic in the same order), rulebooks (output sites and every
neighbour-map entry), the im2col gather and the dense scatter.

Float tolerances, per output element:
- sparse_conv float32: |gpu - cpu| <= CONV_RTOL * sum |f * w| over its terms. The worst-case
  float32 error of an n-term sum is about n * 2**-24 * sum |terms| (n = K * I + K ~ 450 here:
  2.7e-5), the typical one sqrt(n) * 2**-24 (~1e-6); cuBLAS and the NumPy tap loop sum in other orders.
- sparse_conv float16 (fp16 storage, float32 accumulation): plus two fp16 roundings (the GEMM
  output g and the bias add), 2**-11 * (|g| + |g + bias|) <= 2**-10 * (|out| + 2 |bias|).
- the whole encoder: float32 atol RUNNER_ATOL * max |out| (the tolerance of the NumPy runner vs
  the PyTorch reference); float16 atol FP16_MAX_ERROR * max |out| and mean error below
  FP16_MEAN_ERROR * max |out| (21 layers, each output rounded to fp16: relative 2**-11 per layer).
Measured errors and timings (CUDA events, median after warm-up) are printed, never asserted.
"""
from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace

import gpu_timing
import numpy as np
import pytest

from bevfusion_ros.io.tensor import read_tensor
from bevfusion_ros.lidar import _cuda
from bevfusion_ros.lidar.scn import SparseEncoderRunner
from bevfusion_ros.lidar.sparse_conv import ConvGeometry, build_rulebook, scatter_dense, sparse_conv
from bevfusion_ros.lidar.voxelize import voxelize
from bevfusion_ros.model.presets import NUSCENES_R50, TINY

cupy = pytest.importorskip("cupy")

R50 = NUSCENES_R50.pipeline.voxelization
SMALL = TINY.pipeline.voxelization
NON_SQUARE = replace(SMALL, point_range_min=(-54.0, -30.0, -5.0), point_range_max=(54.0, 42.0, 3.0),
                     voxel_size=(0.375, 0.5, 0.25))        # grid (288, 144, 32)
CONV_RTOL = 1e-5
RUNNER_ATOL = 1e-4
FP16_MAX_ERROR = 1e-2
FP16_MEAN_ERROR = 2e-4
GEOMETRIES = [
    ConvGeometry((3, 3, 3), (1, 1, 1), (1, 1, 1), subm=True),      # encoder subm
    ConvGeometry((1, 3, 3), (1, 1, 1), (0, 1, 1), subm=True),
    ConvGeometry((3, 3, 3), (2, 2, 2), (1, 1, 1), subm=False),     # encoder down convs
    ConvGeometry((3, 3, 3), (2, 2, 2), (1, 1, 0), subm=False),     # encoder_layer3 down
    ConvGeometry((1, 1, 3), (1, 1, 2), (0, 0, 0), subm=False),     # conv_out
    ConvGeometry((2, 3, 3), (3, 1, 2), (0, 2, 1), subm=False),
]
GRID = (23, 19, 17)
EXAMPLE_SITE_COUNTS = [44224, 57461, 36921, 17366, 14246]    # test/lidar/test_scn.py


def median_ms(function, repeats: int = 20, warmup: int = 3) -> float:
    """:func:`gpu_timing.median_ms` with this module's counts: 20 timed runs after 3 warm-up runs."""
    return gpu_timing.median_ms(function, repeats, warmup)


def report(capsys, message: str) -> None:
    """Print ``message`` into the test log, tagged ``gpu lidar``, even when pytest captures output."""
    gpu_timing.report(capsys, message, tag="gpu lidar")


# --- voxelize -----------------------------------------------------------------------------
# CuPy points go through voxelize_cuda's kernels; every case compares them bit for bit with the
# NumPy reference on the same points.

def random_points(seed: int, fp16_values: bool) -> np.ndarray:
    """float32 [3840, 5]: uniform over and beyond the range, 60 clusters of 14 points (> 10 per
    voxel), rows on the exclusive max and the inclusive min, rows with NaN / inf."""
    rng = np.random.default_rng(seed)
    clusters = np.repeat(rng.uniform([-50, -50, -4, 0, 0], [50, 50, 2, 255, 0.5], (60, 5)), 14, axis=0)
    points = np.concatenate([rng.uniform([-56, -56, -6, 0, 0], [56, 56, 4, 255, 0.5], (3000, 5)),
                             clusters + rng.normal(0, 0.005, clusters.shape)])
    rng.shuffle(points)
    points = points.astype(np.float16 if fp16_values else np.float32).astype(np.float32)
    points[0, 0], points[1, 2], points[2, :3] = 54.0, 3.0, (-54.0, -54.0, -5.0)
    points[3, 1], points[4, 3], points[5, 2] = np.nan, np.inf, -np.inf
    return points


def edge_points(config, seed: int, count: int = 4000) -> np.ndarray:
    """float32 [count, 5] on voxel edges: per axis min + k * size for k in {-1, 0, 1, 2, grid / 3,
    grid / 2, grid - 2, grid - 1, grid, grid + 1}, rounded from float64 or computed in float32, or
    one float32 step below or above; about a fifth of these coordinates get another index from a
    float64 division than from NumPy's float32 one. Each position holds 4 points (shuffled), so
    voxels also overflow."""
    rng = np.random.default_rng(seed)
    low, size = (np.asarray(values, np.float32) for values in (config.point_range_min, config.voxel_size))
    cells = np.stack([[-1, 0, 1, 2, g // 3, g // 2, g - 2, g - 1, g, g + 1] for g in config.grid_size],
                     axis=1)                                                        # [10, 3]
    k = np.take_along_axis(cells, rng.integers(0, len(cells), (count // 4, 3)), axis=0)
    edges = np.stack([(low + k * size.astype(np.float64)).astype(np.float32),
                      low + k.astype(np.float32) * size])
    xyz = np.take_along_axis(edges, rng.integers(0, 2, (1, *k.shape)), axis=0)[0]
    step = rng.integers(-1, 2, k.shape)                      # one float32 step down, none, up
    toward = np.where(step < 0, -np.inf, np.inf).astype(np.float32)
    xyz = rng.permutation(np.repeat(np.where(step == 0, xyz, np.nextafter(xyz, toward)), 4, axis=0))
    return np.concatenate([xyz, rng.uniform([0, 0], [255, 0.5], (len(xyz), 2))], axis=1).astype(np.float32)


def assert_same_voxels(gpu, cpu) -> None:
    assert all(isinstance(array, cupy.ndarray) for array in (gpu.features, gpu.coords, gpu.point_count))
    np.testing.assert_array_equal(gpu.coords.get(), cpu.coords)
    assert gpu.features.dtype == np.float16 and gpu.coords.dtype == gpu.point_count.dtype == np.int32
    assert gpu.features.shape == cpu.features.shape and gpu.coords.shape == cpu.coords.shape
    np.testing.assert_array_equal(gpu.features.get().view(np.uint16), cpu.features.view(np.uint16))
    np.testing.assert_array_equal(gpu.point_count.get(), cpu.point_count)
    for name in ("points_out_of_range", "points_over_capacity", "voxels_over_capacity",
                 "points_in_dropped_voxels"):
        assert getattr(gpu, name) == getattr(cpu, name), name


def compare_with_numpy(points: np.ndarray, config, device_points=None):
    """Voxels of ``device_points`` (default: ``points`` uploaded) against NumPy's of ``points``;
    returns the NumPy voxels."""
    cpu = voxelize(points, config)
    gpu = voxelize(cupy.asarray(points) if device_points is None else device_points, config)
    assert_same_voxels(gpu, cpu)
    return cpu


@pytest.mark.parametrize("config", [R50, SMALL, replace(SMALL, max_voxels=300),
                                    replace(R50, max_points_per_voxel=1), NON_SQUARE],
                         ids=["r50", "tiny", "tiny-300-voxels", "r50-1-point", "non-square"])
@pytest.mark.parametrize("fp16_values", [True, False], ids=["fp16-values", "float32-values"])
def test_voxelize_matches_numpy_on_random_points(config, fp16_values):
    cpu = compare_with_numpy(random_points(seed=1, fp16_values=fp16_values), config)
    assert cpu.points_out_of_range >= 5 and cpu.point_count.max() == config.max_points_per_voxel
    assert cpu.points_over_capacity > 0 and (cpu.voxels_over_capacity > 0) == (config.max_voxels == 300)


@pytest.mark.parametrize("config", [R50, SMALL, NON_SQUARE], ids=["r50", "tiny", "non-square"])
def test_voxelize_matches_numpy_on_voxel_edges(config):
    cpu = compare_with_numpy(edge_points(config, seed=2), config)
    assert cpu.points_out_of_range > 0 and cpu.points_over_capacity > 0


@pytest.mark.parametrize("channels", [3, 4, 7])
def test_voxelize_matches_numpy_for_any_channel_count(channels):
    points = random_points(seed=3, fp16_values=False)
    extra = np.random.default_rng(3).uniform(-1, 1, (len(points), 2)).astype(np.float32)
    points = np.ascontiguousarray(np.concatenate([points, extra], axis=1)[:, :channels])
    cpu = compare_with_numpy(points, SMALL)
    assert cpu.features.shape[1] == channels


def test_voxelize_matches_numpy_on_fp16_float64_and_strided_points():
    points = random_points(seed=4, fp16_values=False)
    compare_with_numpy(points.astype(np.float16), R50)              # fp16 read and widened in the kernels
    noisy = points.astype(np.float64) + np.random.default_rng(4).normal(0, 1e-9, points.shape)
    compare_with_numpy(noisy, R50)                                  # rounded to float32 first, like NumPy
    wide = cupy.asarray(np.concatenate([points, points[:, ::-1]], axis=1))
    compare_with_numpy(points[::2], R50, device_points=wide[::2, :5])   # a strided view


def test_voxelize_matches_numpy_on_a_crowded_voxel():
    """5000 points of one voxel (a long group to bound) shuffled among 1000 others."""
    rng = np.random.default_rng(5)
    crowded = rng.uniform([0.01, 0.01, 0.05, 0, 0], [0.06, 0.06, 0.15, 255, 0.5], (5000, 5))
    others = rng.uniform([-54, -54, -5, 0, 0], [54, 54, 3, 255, 0.5], (1000, 5))
    points = rng.permutation(np.concatenate([crowded, others])).astype(np.float32)
    for config in (R50, replace(R50, max_points_per_voxel=32), replace(R50, max_voxels=500)):
        cpu = compare_with_numpy(points, config)
        assert cpu.points_over_capacity >= 5000 - config.max_points_per_voxel


def test_voxelize_keeps_numpy_signed_zeros():
    """-0.0 channels: NumPy pads empty slots with +0.0, so a voxel below capacity whose points
    are all -0.0 in a channel averages to +0.0 there; at capacity 1 every voxel is full and keeps
    -0.0."""
    points = random_points(seed=6, fp16_values=True)
    points[6::2, 3] = -0.0
    points[7::2, 4] = -0.0
    points[6:60, 0] = -0.0
    padded = compare_with_numpy(points, SMALL).features[:, 3:]
    full = compare_with_numpy(points, replace(SMALL, max_points_per_voxel=1)).features[:, 3:]
    assert (padded == 0).any() and not np.signbit(padded[padded == 0]).any()
    assert np.signbit(full[full == 0]).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_voxelize_empty_and_all_dropped_clouds(dtype):
    outside = random_points(seed=7, fp16_values=True).astype(dtype)
    outside[:, 2] = 10.0                                        # above the z range
    outside[::3, 0] = np.nan
    for points in (outside, outside[:0], np.ascontiguousarray(outside[:0, :3])):
        gpu = voxelize(cupy.asarray(points), R50)
        assert_same_voxels(gpu, voxelize(points, R50))
        assert gpu.num_voxels == 0 and gpu.points_out_of_range == len(points)
        assert gpu.features.shape == (0, points.shape[1]) and gpu.coords.shape == (0, 4)


def test_voxelize_hands_cupy_points_to_the_kernels(monkeypatch):
    from bevfusion_ros.lidar import voxelize_cuda
    calls = []
    monkeypatch.setattr(voxelize_cuda, "voxelize_cuda",
                        lambda points, config: calls.append(config) or "kernels")
    assert voxelize(cupy.zeros((4, 5), cupy.float32), R50) == "kernels" and calls == [R50]


@pytest.fixture(scope="module")
def example_points(example_data_dir) -> np.ndarray:
    """The example frame's points, fp16 [242180, 5] as stored."""
    return read_tensor(example_data_dir / "points.tensor")


@pytest.mark.parametrize("config", [R50, SMALL, replace(R50, max_voxels=20000)],
                         ids=["r50", "tiny", "r50-20000-voxels"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_voxelize_matches_numpy_on_example_frame(example_points, config, dtype):
    points = example_points.astype(dtype)                     # fp16 as stored, or widened on the host
    gpu = voxelize(cupy.asarray(points), config)
    assert_same_voxels(gpu, voxelize(example_points, config))
    if config is R50:
        assert gpu.num_voxels == 44224 and gpu.points_out_of_range == 13    # spec "Read first", 1.4
    if config.max_voxels == 20000:
        assert gpu.voxels_over_capacity == 44224 - 20000 and gpu.points_in_dropped_voxels > 0


def test_voxelize_timing_on_example_frame(capsys, example_points):
    """Prints the voxelize latency on the example frame, fp16 and float32 points (target on an
    H100: about 0.3 ms)."""
    times = {np.dtype(dtype).name: median_ms(lambda points=cupy.asarray(example_points.astype(dtype)):
                                              voxelize(points, R50))
             for dtype in (np.float16, np.float32)}
    report(capsys, f"{cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, voxelize 242,180 points: "
                   + ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items()))


# --- rulebooks, gather, sparse conv --------------------------------------------------------

def random_sites(rng, count: int, grid=GRID) -> np.ndarray:
    """``count`` unique sites (x, y, z) int32 [count, 3] in random order."""
    keys = rng.choice(math.prod(grid), size=count, replace=False)
    return np.stack(np.unravel_index(keys, grid), axis=1).astype(np.int32)


def assert_same_rulebook(gpu, cpu) -> None:
    assert isinstance(gpu.neighbors, cupy.ndarray) and isinstance(gpu.out_coords, cupy.ndarray)
    assert (gpu.output_shape, gpu.num_inputs) == (cpu.output_shape, cpu.num_inputs)
    assert gpu.neighbors.dtype == gpu.out_coords.dtype == np.int32
    np.testing.assert_array_equal(gpu.out_coords.get(), cpu.out_coords)
    np.testing.assert_array_equal(gpu.neighbors.get(), cpu.neighbors)
    assert gpu.num_pairs == cpu.num_pairs


@pytest.mark.parametrize("count", [0, 1, 300, 3000])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_rulebook_matches_numpy(geometry, count):
    coords = random_sites(np.random.default_rng(count), count)
    cpu = build_rulebook(coords, GRID, geometry)
    gpu = build_rulebook(cupy.asarray(coords), GRID, geometry)
    assert_same_rulebook(gpu, cpu)
    for in_rows, out_rows, cpu_in, cpu_out in zip(gpu.in_rows, gpu.out_rows, cpu.in_rows, cpu.out_rows):
        np.testing.assert_array_equal(in_rows.get(), cpu_in)
        np.testing.assert_array_equal(out_rows.get(), cpu_out)


def test_rulebooks_match_numpy_on_example_frame(example_points):
    """The encoder's site chain on the nuscenes-r50 grid, every neighbour map compared."""
    coords = voxelize(example_points, R50).coords[:, 1:]
    grid, device_coords = R50.sparse_shape, cupy.asarray(coords)
    counts = [len(coords)]
    subm, last = GEOMETRIES[0], ConvGeometry((1, 1, 3), (1, 1, 2), (0, 0, 0), subm=False)
    for padding in ((1, 1, 1), (1, 1, 1), (1, 1, 0), None):
        assert_same_rulebook(build_rulebook(device_coords, grid, subm), build_rulebook(coords, grid, subm))
        down = last if padding is None else ConvGeometry((3, 3, 3), (2, 2, 2), padding, subm=False)
        cpu, gpu = build_rulebook(coords, grid, down), build_rulebook(device_coords, grid, down)
        assert_same_rulebook(gpu, cpu)
        coords, device_coords, grid = cpu.out_coords, gpu.out_coords, cpu.output_shape
        counts.append(len(coords))
    assert counts == EXAMPLE_SITE_COUNTS


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gather_columns_is_an_exact_im2col(dtype):
    rng = np.random.default_rng(3)
    coords = random_sites(rng, 2000)
    rulebook = build_rulebook(cupy.asarray(coords), GRID, GEOMETRIES[0])
    features = rng.normal(size=(2000, 12)).astype(dtype)
    columns = _cuda.gather_columns(cupy.asarray(features), rulebook.neighbors)
    padded = np.concatenate([features, np.zeros((1, 12), dtype)])      # row num_inputs = zeros
    expected = padded[rulebook.neighbors.get().T].reshape(2000, 27 * 12)
    assert columns.dtype == dtype
    np.testing.assert_array_equal(columns.get().view(np.uint8), expected.view(np.uint8))


def conv_case(seed: int, geometry: ConvGeometry, channels=(16, 24), count: int = 2500):
    rng = np.random.default_rng(seed)
    coords = random_sites(rng, count)
    features = rng.normal(size=(count, channels[0])).astype(np.float32)
    weight = rng.normal(size=(*geometry.kernel_size, *channels)).astype(np.float16)   # like the ONNX
    bias = rng.normal(size=channels[1]).astype(np.float16)
    return coords, features, weight, bias


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_sparse_conv_float32_matches_numpy(geometry):
    coords, features, weight, bias = conv_case(4, geometry)
    rulebook = build_rulebook(coords, GRID, geometry)
    expected = sparse_conv(features, weight, rulebook, bias)
    scale = sparse_conv(np.abs(features), np.abs(weight), rulebook)            # sum |f * w|
    gpu_rulebook = build_rulebook(cupy.asarray(coords), GRID, geometry)
    out = sparse_conv(cupy.asarray(features), cupy.asarray(weight), gpu_rulebook, cupy.asarray(bias))
    assert isinstance(out, cupy.ndarray) and out.dtype == np.float32 and out.shape == expected.shape
    assert np.all(np.abs(out.get() - expected) <= CONV_RTOL * scale + 1e-6)


@pytest.mark.parametrize("geometry", GEOMETRIES[:3])
def test_sparse_conv_float16_matches_numpy(geometry):
    coords, features, weight, bias = conv_case(5, geometry)
    features = features.astype(np.float16)
    rulebook = build_rulebook(coords, GRID, geometry)
    expected = sparse_conv(features.astype(np.float32), weight, rulebook, bias)
    scale = sparse_conv(np.abs(features.astype(np.float32)), np.abs(weight), rulebook)
    out = sparse_conv(cupy.asarray(features), cupy.asarray(weight),
                      build_rulebook(cupy.asarray(coords), GRID, geometry), cupy.asarray(bias))
    assert out.dtype == np.float16
    bound = 2.0 ** -10 * (np.abs(expected) + 2 * np.abs(bias.astype(np.float32))) + CONV_RTOL * scale + 1e-6
    assert np.all(np.abs(out.get().astype(np.float32) - expected) <= bound)


@pytest.mark.parametrize("channels", [(5, 16), (16, 16), (16, 32), (32, 64), (64, 128), (128, 128), (24, 48)])
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[2], GEOMETRIES[4]])
@pytest.mark.parametrize("fuse", ["none", "relu", "residual+relu"])
def test_fused_float16_conv_matches_float32(geometry, channels, fuse):
    """The tensor-core kernel (vector loads for I % 16 == 0, element loads otherwise) against the
    NumPy float32 conv on the same fp16 values: one fp16 rounding of the float32 result."""
    coords, features, weight, bias = conv_case(6, geometry, channels, count=3000)
    features = features.astype(np.float16)
    rulebook = build_rulebook(coords, GRID, geometry)
    rng = np.random.default_rng(7)
    residual = (rng.normal(size=(rulebook.num_outputs, channels[1])).astype(np.float16)
                if fuse == "residual+relu" else None)
    relu = fuse != "none"
    expected = sparse_conv(features.astype(np.float32), weight, rulebook, bias,
                           None if residual is None else residual.astype(np.float32), relu)
    scale = sparse_conv(np.abs(features.astype(np.float32)), np.abs(weight), rulebook)
    gpu_rulebook = build_rulebook(cupy.asarray(coords), GRID, geometry)
    out = sparse_conv(cupy.asarray(features), cupy.asarray(weight), gpu_rulebook, cupy.asarray(bias),
                      None if residual is None else cupy.asarray(residual), relu)
    assert out.dtype == np.float16 and out.shape == expected.shape
    error = np.abs(out.get().astype(np.float32) - expected)
    assert np.all(error <= 2.0 ** -11 * np.abs(expected) + CONV_RTOL * scale + 1e-6), error.max()
    if relu:
        assert (out.get() >= 0).all() and (expected == 0).any()


def test_sparse_conv_and_scatter_on_no_sites():
    rulebook = build_rulebook(cupy.zeros((0, 3), cupy.int32), GRID, GEOMETRIES[2])
    out = sparse_conv(cupy.zeros((0, 4), cupy.float32), cupy.ones((3, 3, 3, 4, 2)), rulebook)
    assert isinstance(out, cupy.ndarray) and out.shape == (0, 2) and rulebook.num_outputs == 0
    dense = scatter_dense(out, rulebook.out_coords, rulebook.output_shape)
    assert dense.shape == (1, 2, *rulebook.output_shape) and not dense.any()


def test_scatter_dense_matches_numpy():
    rng = np.random.default_rng(6)
    coords = random_sites(rng, 500)
    features = rng.normal(size=(500, 7)).astype(np.float32)
    dense = scatter_dense(cupy.asarray(features), cupy.asarray(coords), GRID)
    np.testing.assert_array_equal(dense.get(), scatter_dense(features, coords, GRID))


# --- the SCN runner ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_case(example_points):
    """The tiny preset's SCN graph (random weights, BN calibrated on a quarter of the example frame,
    so biases and activations have a trained network's order) and the frame's tiny voxels."""
    torch = pytest.importorskip("torch")
    from bevfusion_ros.model.bevfusion import calibrate_batchnorm
    from bevfusion_ros.model.scn_onnx import scn_graph_from_encoder
    from bevfusion_ros.model.sparse_encoder import SparseEncoder
    voxels = voxelize(example_points, SMALL)
    torch.manual_seed(11)
    encoder = SparseEncoder(TINY).eval()
    frame = (torch.from_numpy(voxels.features[::4].astype(np.float32)), torch.from_numpy(voxels.coords[::4]))
    with torch.no_grad():
        calibrate_batchnorm(encoder, lambda args: encoder(*args), [frame])
    return scn_graph_from_encoder(encoder), voxels


@pytest.fixture(scope="module")
def r50_case(example_points):
    """The nuscenes-r50 SCN graph (40 nodes, 21 convs; random weights, default BN) and the example
    frame's 44,224 voxels."""
    torch = pytest.importorskip("torch")
    from bevfusion_ros.model.scn_onnx import scn_graph_from_encoder
    from bevfusion_ros.model.sparse_encoder import SparseEncoder
    torch.manual_seed(12)
    return scn_graph_from_encoder(SparseEncoder(NUSCENES_R50).eval()), voxelize(example_points, R50)


def compare_runner(capsys, nodes, voxels, grid, name: str) -> None:
    """GPU float32 and float16 runs against the NumPy runner; prints the errors."""
    expected = SparseEncoderRunner(nodes).run(voxels.features, voxels.coords, grid)
    peak = float(np.abs(expected).max())
    assert np.count_nonzero(expected) > 0.02 * expected.size and peak > 0
    features, coords = cupy.asarray(voxels.features), cupy.asarray(voxels.coords)
    out = SparseEncoderRunner(nodes).run(features, coords, grid)
    assert isinstance(out, cupy.ndarray) and out.dtype == np.float32 and out.flags.c_contiguous
    float32_error = float(np.abs(out.get() - expected).max()) / peak
    half = SparseEncoderRunner(nodes, compute_dtype=np.float16, output_dtype=np.float16).run(
        features, coords, grid)
    assert isinstance(half, cupy.ndarray) and half.dtype == np.float16 and half.shape == expected.shape
    half_error = np.abs(half.get().astype(np.float32) - expected) / peak
    report(capsys, f"{name}: max |out| {peak:.3g}; error / max |out|: float32 {float32_error:.2e}, "
                   f"float16 max {half_error.max():.2e} mean {half_error.mean():.2e}")
    assert float32_error <= RUNNER_ATOL
    assert half_error.max() <= FP16_MAX_ERROR and half_error.mean() <= FP16_MEAN_ERROR


def test_runner_matches_numpy_on_tiny_graph(capsys, tiny_case):
    nodes, voxels = tiny_case
    compare_runner(capsys, nodes, voxels, SMALL.sparse_shape, "tiny")


def test_runner_matches_numpy_on_r50_graph(capsys, r50_case):
    nodes, voxels = r50_case
    compare_runner(capsys, nodes, voxels, R50.sparse_shape, "nuscenes-r50")


def test_runner_is_deterministic_and_accepts_host_features(tiny_case):
    nodes, voxels = tiny_case
    runner = SparseEncoderRunner(nodes, output_dtype=np.float16)
    grid = SMALL.sparse_shape
    first = runner.run(cupy.asarray(voxels.features), cupy.asarray(voxels.coords), grid)
    second = runner.run(voxels.features, cupy.asarray(voxels.coords), grid)     # features uploaded
    assert first.dtype == np.float16 and isinstance(second, cupy.ndarray)
    np.testing.assert_array_equal(first.get().view(np.uint16), second.get().view(np.uint16))


def test_runner_input_errors_and_empty_frame_on_gpu(tiny_case):
    nodes, _ = tiny_case
    runner = SparseEncoderRunner(nodes, compute_dtype=np.float16)
    grid = SMALL.sparse_shape
    rng = np.random.default_rng(7)
    coords = np.concatenate([np.zeros((50, 1), np.int32), random_sites(rng, 50, grid)], axis=1)
    features = cupy.asarray(rng.normal(size=(50, 5)).astype(np.float16))
    empty = runner.run(cupy.zeros((0, 5), cupy.float16), cupy.zeros((0, 4), cupy.int32), grid)
    assert isinstance(empty, cupy.ndarray) and empty.shape == (1, TINY.lidar_bev_channels, *TINY.bev_size)
    assert not empty.any()
    outside, duplicate, second_frame = coords.copy(), coords.copy(), coords.copy()
    outside[7, 3] = grid[2]
    duplicate[9] = duplicate[3]
    second_frame[0, 0] = 1
    for bad, message in ((outside, r"1 voxel coordinate\(s\) outside the sparse grid .*= \(\d+, \d+, 41\)"),
                         (duplicate, "not unique: 1 duplicate"), (second_frame, "batch index")):
        with pytest.raises(ValueError, match=message):
            runner.run(features, cupy.asarray(bad), grid)
    with pytest.raises(ValueError, match="compute_dtype float16 needs CuPy inputs"):
        runner.run(features.get(), coords, grid)


def test_encoder_timing_on_example_frame(capsys, r50_case, example_points):
    """Prints voxelize, rulebook-chain and whole-encoder latency (float32 and float16) on the
    example frame; the encoder target on an H100 is <= 3 ms."""
    nodes, voxels = r50_case
    grid = R50.sparse_shape
    points, features, coords = (cupy.asarray(a) for a in (example_points, voxels.features, voxels.coords))
    times = {"voxelize": median_ms(lambda: voxelize(points, R50)),
             "rulebooks": median_ms(lambda: build_encoder_rulebooks(nodes, coords[:, 1:], grid))}
    for dtype in (np.float32, np.float16):
        runner = SparseEncoderRunner(nodes, compute_dtype=dtype, output_dtype=dtype)
        times[f"encoder {np.dtype(dtype).name}"] = median_ms(lambda: runner.run(features, coords, grid))
    report(capsys, f"{cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, 44,224 voxels: "
                   + ", ".join(f"{name} {ms:.2f} ms" for name, ms in times.items()))


def build_encoder_rulebooks(nodes, coords, grid) -> list:
    """Every distinct rulebook of the graph's conv chain (sites change at strided convs)."""
    built = {}
    for layer in (node.layer for node in nodes if node.layer is not None):
        if layer.rulebook not in built:
            geometry = ConvGeometry(layer.kernel_size, layer.stride, layer.padding, layer.subm)
            built[layer.rulebook] = rulebook = build_rulebook(coords, grid, geometry)
            coords, grid = rulebook.out_coords, rulebook.output_shape
    return list(built.values())


def test_lidar_modules_do_not_import_cupy():
    """``import bevfusion_ros.lidar.*`` must work on CPU machines: CuPy is imported lazily."""
    script = ("import sys\n"
              "import bevfusion_ros.lidar._cuda, bevfusion_ros.lidar.scn, bevfusion_ros.lidar.voxelize\n"
              "import bevfusion_ros.lidar.voxelize_cuda\n"
              "assert 'cupy' not in sys.modules, 'cupy imported'\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
