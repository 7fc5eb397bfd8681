"""Per-layer anatomy of the sparse lidar encoder on one frame: sites, real pairs, FLOPs, bytes,
and (on CuPy) CUDA-event and host time per layer.

    python benchmarks/lidar_profile.py MODEL_DIR EXAMPLE_DATA_DIR [--gpu] [--dtype float16]

FLOPs count the real (input, output) pairs only (2 * pairs * I * O); "im2col bytes" is what the
GPU path's gather writes and the GEMM reads (N_out * K * I elements, twice).
"""
from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np

from bevfusion_ros.config import load_config
from bevfusion_ros.io import load_example_data
from bevfusion_ros.lidar.scn import SparseEncoderRunner, sparse_input
from bevfusion_ros.lidar.sparse_conv import build_rulebook
from bevfusion_ros.lidar.voxelize import voxelize
from bevfusion_ros.pipeline import prepare_points
from bevfusion_ros.tools.cuda_timing import median_ms

layer_ms = partial(median_ms, repeats=20, warmup=3)      # one layer's CUDA-event median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    config = load_config(f"{args.model}/bevfusion.yaml")
    frame = load_example_data(args.data)
    points = prepare_points(frame.points, config).points
    xp = np
    if args.gpu:
        import cupy as xp
        points = xp.asarray(points)
    voxels = voxelize(points, config.voxelization)
    runner = SparseEncoderRunner.from_onnx(f"{args.model}/lidar.backbone.xyz.onnx", args.dtype)
    x = sparse_input(voxels.features, voxels.coords, runner.input_spatial_shape, args.dtype)
    rows, cases = [], []
    rulebooks: dict = {}
    for node, conv in zip(runner.nodes, runner._convs_for(xp)):
        if conv is None:
            continue
        layer = conv.layer
        key = layer.rulebook
        fresh = key not in rulebooks
        rulebook = conv.rulebook(x, rulebooks)
        pairs = rulebook.num_pairs
        flops = 2 * pairs * layer.in_channels * layer.out_channels
        im2col = (2 * rulebook.num_outputs * rulebook.geometry.kernel_volume * layer.in_channels
                  * np.dtype(args.dtype).itemsize)
        rows.append((node.name, layer.subm, x.features.shape[0], rulebook.num_outputs, layer.in_channels,
                     layer.out_channels, rulebook.geometry.kernel_volume, pairs, flops, im2col, fresh))
        cases.append((conv, x, rulebook, fresh))
        x = conv(x, rulebooks)
    print(f"{'layer':<34}{'subm':>5}{'N_in':>8}{'N_out':>8}{'I':>5}{'O':>5}{'K':>4}{'pairs':>10}"
          f"{'GFLOP':>8}{'im2col MB':>10}")
    for name, subm, n_in, n_out, i, o, k, pairs, flops, im2col, fresh in rows:
        print(f"{name[-33:]:<34}{subm!s:>5}{n_in:>8}{n_out:>8}{i:>5}{o:>5}{k:>4}{pairs:>10}"
              f"{flops / 1e9:>8.2f}{im2col / 1e6:>10.1f}{'  new rulebook' if fresh else ''}")
    print(f"total: {sum(r[8] for r in rows) / 1e9:.2f} GFLOP over real pairs, "
          f"{sum(r[9] for r in rows) / 1e6:.0f} MB im2col traffic, {len(rows)} convs")
    if args.gpu:
        profile_layers(cases, xp)
        profile_gpu(runner, voxels, xp)


def profile_layers(cases, cupy) -> None:
    """Per conv: rulebook build, and the conv itself as the tiled fp16 tensor-core kernel (what
    ``sparse_conv`` runs for fp16), im2col + cuBLAS fp16 and float32."""
    from bevfusion_ros.lidar import _cuda
    from bevfusion_ros.lidar.sparse_conv import prepare_fp16_conv
    print(f"{'layer':<10}{'rulebook':>10}{'tiled16':>10}{'im2col16':>10}{'im2col32':>10}  ms (CUDA events)")
    totals = np.zeros(4)
    for conv, x, rulebook, fresh in cases:
        build = layer_ms(lambda: build_rulebook(x.coords, x.spatial_shape, conv.geometry)) if fresh else 0.0
        f16 = x.features.astype(cupy.float16)
        f32 = x.features.astype(cupy.float32)
        w16, w32 = conv.weight.astype(cupy.float16), conv.weight.astype(cupy.float32)
        tiled = float("nan")
        prepared = prepare_fp16_conv(w16, conv.bias)
        if prepared is not None:
            tiled = layer_ms(lambda: prepared(f16, rulebook.neighbors))
        taps16 = w16.reshape(-1, w16.shape[4])
        im2col16 = layer_ms(lambda: _cuda.gather_columns(f16, rulebook.neighbors) @ taps16)
        taps32 = w32.reshape(-1, w32.shape[4])
        im2col32 = layer_ms(lambda: _cuda.gather_columns(f32, rulebook.neighbors) @ taps32)
        row = np.array([build, tiled, im2col16, im2col32])
        totals += np.nan_to_num(row)
        print(f"{conv.name[-9:]:<10}" + "".join(f"{value:10.3f}" for value in row))
    print(f"{'sum':<10}" + "".join(f"{value:10.3f}" for value in totals))


def profile_gpu(runner, voxels, cupy) -> None:
    for _ in range(5):
        runner.run(voxels.features, voxels.coords, runner.input_spatial_shape)
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(20):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        begin = time.perf_counter()
        start.record()
        runner.run(voxels.features, voxels.coords, runner.input_spatial_shape)
        host = time.perf_counter() - begin
        end.record()
        end.synchronize()
        times.append((cupy.cuda.get_elapsed_time(start, end), host * 1e3))
    gpu, host = np.median(np.array(times), axis=0)
    print(f"encoder ({runner.compute_dtype}): {gpu:.3f} ms events, {host:.3f} ms host enqueue")


if __name__ == "__main__":
    main()
