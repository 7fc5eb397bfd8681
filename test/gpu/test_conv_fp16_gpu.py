"""The tiled fp16 sparse conv (:func:`bevfusion_ros.lidar._conv_fp16.sparse_conv_fp16_tiled`)
against a float64 NumPy reference, for every tiling against the default one.

Reference: a brute-force float64 loop over the taps of the neighbour map (exact products of the
fp16 features and weights, float64 sums), + bias (+ residual) (ReLU).

Tolerances, per output element (as in test_lidar_ops_gpu.test_fused_float16_conv_matches_float32):
- against the float64 reference: |gpu - ref| <= 2**-11 |ref| + CONV_RTOL * sum |f * w| + 1e-6.
  2**-11 |ref|: the one rounding of the float32 result to fp16 (half an fp16 ulp, relative);
  CONV_RTOL * sum |f * w|: the float32 accumulation on tensor cores, worst case about
  n * 2**-24 * sum |terms| for n = K * I terms, typically sqrt(n) * 2**-24 (3.5e-6 for
  n = 27 * 128); 1e-6 absorbs the float32 bias / residual adds near zero.
- every tiling against the default one: all run the same m16n8k16 float32 accumulations over the
  same 16-channel k-steps in the same order (taps ascending, a tap without any neighbour in the
  tile skipped; a skipped tap adds exact zeros otherwise), so the bits are expected to be equal;
  asserted within 1 fp16 ulp (a tile size other than 64 rows changes which all-zero k-steps are
  multiplied, which can only flip the sign of a zero).
Timings (CUDA events, median after warm-up) are printed, never asserted.
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from gpu_timing import median_ms, report

from bevfusion_ros.lidar import _cuda
from bevfusion_ros.lidar._conv_fp16 import TileConfig, default_tile_config, sparse_conv_fp16_tiled
from bevfusion_ros.lidar.sparse_conv import ConvGeometry, build_rulebook

cupy = pytest.importorskip("cupy")

CONV_RTOL = 1e-5
GRID = (23, 19, 17)
SUBM = ConvGeometry((3, 3, 3), (1, 1, 1), (1, 1, 1), subm=True)
DOWN = ConvGeometry((3, 3, 3), (2, 2, 2), (1, 1, 1), subm=False)
OUT_CHANNELS = (16, 32, 64, 128)
IN_CHANNELS = (5, 16, 32, 64, 128, 24)
# Tilings the timing test sweeps; every one is also checked for correctness below.
SWEEP = (TileConfig(64, 2, 4, 32, 3), TileConfig(64, 4, 2, 32, 3), TileConfig(32, 1, 4, 32, 3),
         TileConfig(128, 4, 2, 32, 3), TileConfig(128, 2, 4, 32, 3), TileConfig(64, 2, 4, 64, 2),
         TileConfig(64, 2, 4, 32, 4), TileConfig(64, 2, 2, 32, 3), TileConfig(64, 4, 1, 32, 3),
         TileConfig(128, 4, 1, 32, 3), TileConfig(64, 2, 1, 32, 3), TileConfig(32, 2, 1, 32, 4),
         TileConfig(128, 4, 2, 64, 3), TileConfig(64, 2, 4, 32, 3, min_blocks=3))


def random_sites(rng, count: int, grid=GRID) -> np.ndarray:
    """``count`` unique sites (x, y, z) int32 [count, 3] in random order."""
    keys = rng.choice(math.prod(grid), size=count, replace=False)
    return np.stack(np.unravel_index(keys, grid), axis=1).astype(np.int32)


def conv_case(seed: int, geometry: ConvGeometry, channels_in: int, channels_out: int, count: int,
              residual: bool):
    """(features fp16 [N_in, I], tap weights fp16 [K, I, O], neighbours int32 [K, N_out], bias fp16
    [O], residual fp16 [N_out, O] or None) on ``count`` random sites of GRID."""
    rng = np.random.default_rng(seed)
    rulebook = build_rulebook(random_sites(rng, count), GRID, geometry)
    features = rng.normal(size=(count, channels_in)).astype(np.float16)
    weight = rng.normal(size=(geometry.kernel_volume, channels_in, channels_out)).astype(np.float16)
    bias = rng.normal(size=channels_out).astype(np.float16)
    skip = rng.normal(size=(rulebook.num_outputs, channels_out)).astype(np.float16) if residual else None
    return features, weight, rulebook.neighbors, bias, skip


def reference(features, weight, neighbors, bias, residual, relu):
    """float64 brute force: sum over taps of features[neighbors[t]] @ weight[t] (zero rows for
    no neighbour) + bias (+ residual) (ReLU); also sum |f * w| (the accumulation scale)."""
    n_in, channels_in = features.shape
    padded = np.concatenate([features.astype(np.float64), np.zeros((1, channels_in))])
    out = np.zeros((neighbors.shape[1], weight.shape[2]))
    scale = np.zeros_like(out)
    for t, rows in enumerate(neighbors):
        gathered, w = padded[np.minimum(rows, n_in)], weight[t].astype(np.float64)
        out += gathered @ w
        scale += np.abs(gathered) @ np.abs(w)
    out += bias.astype(np.float64)
    if residual is not None:
        out += residual.astype(np.float64)
    return (np.maximum(out, 0.0) if relu else out), scale


def run_both(features, weight, neighbors, bias, residual, relu, config=None):
    """(given tiling, default tiling) fp16 results on the GPU, as NumPy arrays."""
    packed = _cuda.pack_conv_weight(cupy.asarray(weight))
    args = (cupy.asarray(features), packed, cupy.asarray(neighbors), cupy.asarray(bias),
            None if residual is None else cupy.asarray(residual), relu)
    tiled = sparse_conv_fp16_tiled(*args, config=config)
    assert isinstance(tiled, cupy.ndarray) and tiled.dtype == np.float16 and tiled.flags.c_contiguous
    return tiled.get(), sparse_conv_fp16_tiled(*args).get()


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in fp16 ulps (sign-magnitude bits mapped to ordered integers; +0 == -0)."""
    def ordered(x):
        bits = x.view(np.uint16).astype(np.int32)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)
    return np.abs(ordered(a) - ordered(b))


def check(out, original, expected, scale, label: str) -> None:
    assert out.shape == expected.shape
    error = np.abs(out.astype(np.float64) - expected)
    bound = 2.0 ** -11 * np.abs(expected) + CONV_RTOL * scale + 1e-6
    assert np.all(error <= bound), f"{label}: max error / bound {(error / bound).max():.3g}"
    distance = ulp_distance(out, original)
    assert distance.max(initial=0) <= 1, f"{label}: {np.count_nonzero(distance)} elements differ, " \
                                         f"max {distance.max()} ulp from the default tiling"


@pytest.mark.parametrize("fuse", ["none", "relu", "residual+relu"])
@pytest.mark.parametrize("geometry", [SUBM, DOWN], ids=["subm", "strided"])
@pytest.mark.parametrize("channels_in", IN_CHANNELS)
@pytest.mark.parametrize("channels_out", OUT_CHANNELS)
def test_tiled_conv_matches_reference(channels_out, channels_in, geometry, fuse):
    """Default tiling per O; I = 5 and 24 cover element loads (I % 8 != 0) and zero-filled channels
    past I within the last 16-channel slice; 3000 random sites (N_out not a multiple of 64)."""
    relu = fuse != "none"
    features, weight, neighbors, bias, residual = conv_case(
        channels_in * 1000 + channels_out, geometry, channels_in, channels_out, 3000, fuse == "residual+relu")
    expected, scale = reference(features, weight, neighbors, bias, residual, relu)
    out, original = run_both(features, weight, neighbors, bias, residual, relu)
    check(out, original, expected, scale, f"O={channels_out} I={channels_in}")
    if relu:
        assert (out >= 0).all() and (expected == 0).any()


@pytest.mark.parametrize("config", SWEEP, ids=str)
@pytest.mark.parametrize("channels_in", [5, 24, 128])
@pytest.mark.parametrize("channels_out", [32, 64, 128])
def test_every_swept_tiling_is_correct(config, channels_in, channels_out):
    if not config.fits(channels_out) or config.accumulators(channels_out) > 64:
        pytest.skip(f"{config} does not split {channels_out} columns into <= 64 accumulators")
    features, weight, neighbors, bias, residual = conv_case(7, SUBM, channels_in, channels_out, 2500, True)
    expected, scale = reference(features, weight, neighbors, bias, residual, True)
    out, original = run_both(features, weight, neighbors, bias, residual, True, config)
    check(out, original, expected, scale, str(config))


@pytest.mark.parametrize("count", [1, 63, 65, 200])
@pytest.mark.parametrize("channels_out", OUT_CHANNELS)
def test_partial_tiles(channels_out, count):
    """N_out below or just past a tile of 64 rows (and 32 / 128 for the swept tilings)."""
    features, weight, neighbors, bias, residual = conv_case(count, SUBM, 16, channels_out, count, True)
    expected, scale = reference(features, weight, neighbors, bias, residual, False)
    for config in (None, TileConfig(32, 2, 1, 32, 2), TileConfig(128, 4, 1 + (channels_out == 128), 16, 4)):
        out, original = run_both(features, weight, neighbors, bias, residual, False, config)
        check(out, original, expected, scale, f"{count} rows {config}")


@pytest.mark.parametrize("channels_out", OUT_CHANNELS)
def test_empty_output_and_no_neighbours(channels_out):
    """No output rows: an empty result, no launch. No neighbour at all (also with no input rows):
    every tap skipped, act(bias + residual)."""
    rng = np.random.default_rng(channels_out)
    weight = cupy.asarray(rng.normal(size=(27, 24, channels_out)).astype(np.float16))
    packed = _cuda.pack_conv_weight(weight)
    bias = rng.normal(size=channels_out).astype(np.float16)
    for n_in in (0, 40):
        features = cupy.asarray(rng.normal(size=(n_in, 24)).astype(np.float16))
        empty = sparse_conv_fp16_tiled(features, packed, cupy.zeros((27, 0), cupy.int32), cupy.asarray(bias))
        assert isinstance(empty, cupy.ndarray) and empty.shape == (0, channels_out) and empty.dtype == np.float16
        residual = rng.normal(size=(70, channels_out)).astype(np.float16)
        nowhere = cupy.full((27, 70), n_in, dtype=cupy.int32)
        out = sparse_conv_fp16_tiled(features, packed, nowhere, cupy.asarray(bias), cupy.asarray(residual),
                                     relu=True).get()
        expected = np.maximum(bias.astype(np.float32) + residual.astype(np.float32), 0).astype(np.float16)
        np.testing.assert_array_equal(out.view(np.uint16), expected.view(np.uint16))


def test_validation_errors():
    features = cupy.zeros((10, 24), cupy.float16)
    neighbors = cupy.full((27, 10), 10, cupy.int32)
    bias = cupy.zeros(64, cupy.float16)
    packed = _cuda.pack_conv_weight(cupy.zeros((27, 24, 64), cupy.float16))
    assert packed.shape == (27, 64, 32)
    for bad in (packed.astype(cupy.float32), packed[:9], packed[:, :, :16].copy(),
                cupy.zeros((27, 64, 48), cupy.float16), packed[:, :, ::-1],
                cupy.zeros((27, 8, 32), cupy.float16), cupy.zeros((27, 144, 32), cupy.float16)):
        with pytest.raises(ValueError, match="sparse_conv_fp16_tiled: packed weight"):
            sparse_conv_fp16_tiled(features, bad, neighbors, bias[:bad.shape[1]])
    with pytest.raises(ValueError, match="residual"):
        sparse_conv_fp16_tiled(features, packed, neighbors, bias, cupy.zeros((10, 32), cupy.float16))
    with pytest.raises(ValueError, match="does not split 64 columns"):
        sparse_conv_fp16_tiled(features, packed, neighbors, bias, config=TileConfig(64, 2, 8, 32, 3))
    for fields in ((48, 2, 2, 32, 3), (64, 8, 1, 32, 3), (64, 2, 2, 48, 3), (64, 2, 2, 32, 1),
                   (64, 2, 2, 32, 5), (128, 8, 8, 32, 3), (64, 2, 2, 32, 3, 0)):
        with pytest.raises(ValueError, match="invalid tile config"):
            TileConfig(*fields)


def test_default_configs_split_every_supported_width():
    for channels_out in range(16, 129, 16):
        config = default_tile_config(channels_out)
        assert config.fits(channels_out) and config.threads <= 256


def test_conv_fp16_module_does_not_import_cupy():
    script = ("import sys\nimport bevfusion_ros.lidar._conv_fp16\n"
              "assert 'cupy' not in sys.modules, 'cupy imported'\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- timing ------------------------------------------------------------------------------------

def encoder_site_sets(request):
    """Site sets of the encoder's levels: the example frame's (44224, 57461, 36921, 17366 sites,
    nuscenes-r50 grid) when the example data is there, else a synthetic surface of similar sizes."""
    try:
        data_dir = request.getfixturevalue("example_data_dir")
    except pytest.skip.Exception:
        data_dir = None
    if data_dir is not None:
        from bevfusion_ros.io.tensor import read_tensor
        from bevfusion_ros.lidar.voxelize import voxelize
        from bevfusion_ros.model.presets import NUSCENES_R50
        config = NUSCENES_R50.pipeline.voxelization
        coords = cupy.asarray(voxelize(read_tensor(data_dir / "points.tensor"), config).coords[:, 1:])
        grid, sets = config.sparse_shape, []
        for padding in ((1, 1, 1), (1, 1, 1), (1, 1, 0), None):
            sets.append((coords, grid))
            if padding is not None:
                rulebook = build_rulebook(coords, grid, ConvGeometry((3, 3, 3), (2, 2, 2), padding, subm=False))
                coords, grid = rulebook.out_coords, rulebook.output_shape
        return sets, "example frame"
    rng = np.random.default_rng(0)
    sets = []
    for side, grid in ((111, (240, 240, 8)), (76, (160, 160, 8))):    # ~37k and ~17k sites
        x, y = np.meshgrid(np.arange(side) * 2, np.arange(side) * 2, indexing="ij")
        x, y = x.ravel(), y.ravel()
        z = (np.sin(x / 17.0) + np.cos(y / 23.0) + 2).astype(np.int32) % grid[2]
        coords = np.unique(np.concatenate([np.stack([x, y, z], 1), np.stack([x + 1, y, z], 1),
                                           np.stack([x, y + 1, (z + rng.integers(0, 2, z.size)) % grid[2]], 1)]),
                           axis=0).astype(np.int32)
        sets.append((cupy.asarray(coords), grid))
    return [None, None, sets[0], sets[1]], "synthetic surface"


def test_tiled_conv_timing(request, capsys):
    """Prints median ms (CUDA events) of the tiled kernel with its default
    tiling, the swept tilings and im2col + cuBLAS fp16, for the subm 3x3x3 convs of 17k sites at
    O = I = 128 and 37k sites at O = I = 64 (the measured hot layers)."""
    sets, source = encoder_site_sets(request)
    rng = np.random.default_rng(1)
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    for level, channels in ((3, 128), (2, 64)):
        coords, grid = sets[level]
        rulebook = build_rulebook(coords, grid, SUBM)
        n = rulebook.num_outputs
        features = cupy.asarray(rng.normal(size=(n, channels)).astype(np.float16))
        weight = cupy.asarray((rng.normal(size=(27, channels, channels)) / 30).astype(np.float16))
        bias = cupy.asarray(rng.normal(size=channels).astype(np.float16))
        packed = _cuda.pack_conv_weight(weight)
        neighbors = rulebook.neighbors
        times = {f"tiled default {default_tile_config(channels)}":
                     median_ms(lambda: sparse_conv_fp16_tiled(features, packed, neighbors, bias))}
        taps = weight.reshape(-1, channels)
        times["im2col + GEMM"] = median_ms(lambda: _cuda.gather_columns(features, neighbors) @ taps)
        for config in SWEEP:
            if config.fits(channels) and config.accumulators(channels) <= 64:
                times[f"tiled {config}"] = median_ms(
                    lambda config=config: sparse_conv_fp16_tiled(features, packed, neighbors, bias, config=config))
        pairs = rulebook.num_pairs
        report(capsys, f"{name}, {source}: subm conv {n} rows, O = I = {channels}, {pairs} pairs "
                       f"({pairs / (27 * n):.0%} of dense)\n" +
               "\n".join(f"    {ms:7.3f} ms  {label}" for label, ms in times.items()), tag="gpu conv")
