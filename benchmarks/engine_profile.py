"""Each dense engine of a model folder on its own: CUDA-graph replay time (channels-last weights,
with and without the fused cuDNN conv+bias(+residual)+ReLU calls, and NCHW) and the kernels of
one replay (CUPTI, via torch.profiler), with the ONNX ops behind them.

    python benchmarks/engine_profile.py MODEL_DIR [--precision fp16] [--top 12]

Inputs are random, on CuPy, as in the pipeline. Times are CUDA-event medians of ``engine.run``
(the static-input copies included).
"""
from __future__ import annotations

import argparse
import collections

import cupy
import numpy as np
import torch

from bevfusion_ros.engines.select import DENSE_MODEL_FILES
from bevfusion_ros.engines.torch_gpu import TorchEngine
from bevfusion_ros.tools.cuda_timing import median_ms

VARIANTS = {"fused": {}, "unfused": {"fuse_conv_activations": False},
            "NCHW": {"channels_last": False, "fuse_conv_activations": False}}


def random_feeds(engine: TorchEngine) -> dict:
    """Random CuPy inputs of the engine's bindings (floats in [0, 1), integers 0)."""
    rng = cupy.random.default_rng(0)
    feeds = {}
    for spec in engine.inputs.values():
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.random(spec.shape, dtype=np.float32).astype(spec.dtype)
        else:
            feeds[spec.name] = cupy.zeros(spec.shape, dtype=spec.dtype)
    return feeds


def kernel_table(run, top: int) -> list[tuple[str, float, int]]:
    """(kernel name, GPU ms, launches) of one ``run()``, largest first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        run()
        torch.cuda.synchronize()
    totals: dict = collections.Counter()
    counts: dict = collections.Counter()
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / 1e3
            counts[event.name] += 1
    return [(name, ms, counts[name]) for name, ms in totals.most_common(top)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--precision", default="fp16", choices=("fp16", "fp32"))
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    for file_name in DENSE_MODEL_FILES:
        path = f"{args.model}/{file_name}"
        times = {}
        for variant, options in VARIANTS.items():
            engine = TorchEngine(path, dtype=dtype, **options)
            feeds = random_feeds(engine)
            times[variant] = median_ms(lambda: engine.run(feeds), repeats=50, warmup=5)
            if variant == "fused":
                table = kernel_table(lambda: engine.run(feeds), args.top)
                ops = dict(engine.module.runtime_ops)
        print(f"\n{file_name}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items())
              + f"; ops {ops}")
        for name, ms, count in table:
            print(f"  {ms:7.3f} ms {count:4d}x  {name[:200]}")


if __name__ == "__main__":
    main()
