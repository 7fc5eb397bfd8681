"""Training throughput on the GPU machine: where a training step's time goes.

    python3 benchmarks/train_profile.py --preset tiny --scenes 24 --steps 30 --batches 1,4,8

1. builds ``--scenes`` preprocessed scenes in parallel into ``--cache`` (process pool);
2. per batch size: one warm-up pass over the scenes (rulebooks cached), then ``--steps`` timed
   optimiser steps: median step time and samples per second;
3. for the first batch size: the torch profiler's kernels ranked by device time and
   ``cProfile``'s functions ranked by host time, over a few steps;
4. data throughput: a DataLoader with ``--workers`` processes generating fresh scenes (no cache).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from bevfusion_ros.model.presets import get_preset
from bevfusion_ros.train.data import SceneDataset, collate_samples
from bevfusion_ros.train.loop import TrainConfig, new_trainer


def _build(args: tuple[str, str, int]) -> int:
    preset_name, cache, seed = args
    torch.set_num_threads(1)
    SceneDataset(get_preset(preset_name), [seed], cache).base_sample(0)
    return seed


def build_cache(preset_name: str, cache: str, seeds: list[int], processes: int) -> float:
    start = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_build, [(preset_name, cache, seed) for seed in seeds]))
    return time.perf_counter() - start


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile_batch(preset_name: str, seeds: list[int], cache: str, batch: int, steps: int,
                  device: str, detailed: bool) -> None:
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(preset=get_preset(preset_name), seeds=seeds, out_dir=Path(out),
                             batch_size=batch, device=device, amp=True, cache_dir=Path(cache),
                             rulebook_cache=len(seeds), log=None)
        trainer, _ = new_trainer(config)
    dataset = SceneDataset(config.preset, seeds, cache, memory_cache=True)
    samples = [dataset[i] for i in range(len(seeds))]
    batches = itertools.cycle([samples[i:i + batch] for i in range(0, len(samples), batch)])
    for _ in range(max(1, len(samples) // batch)):          # warm-up: rulebooks, cuDNN
        trainer.step(next(batches), 1e-4)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step(next(batches), 1e-4)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    median = float(np.median(seconds))
    print(f"batch {batch}: {median * 1000:.1f} ms/step, {batch / median:.1f} samples/s", flush=True)
    if not detailed:
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(5):
            trainer.step(next(batches), 1e-4)
        _sync(device)
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60),
          flush=True)
    host = cProfile.Profile()
    host.enable()
    for _ in range(5):
        trainer.step(next(batches), 1e-4)
    _sync(device)
    host.disable()
    stream = io.StringIO()
    pstats.Stats(host, stream=stream).sort_stats("tottime").print_stats(20)
    print(stream.getvalue()[-5000:], flush=True)


def data_throughput(preset_name: str, workers: int, count: int) -> None:
    dataset = SceneDataset(get_preset(preset_name), list(range(50_000, 50_000 + count)))
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=collate_samples)
    warm = time.perf_counter()
    for index, _ in enumerate(loader):
        if index == workers:
            warm = time.perf_counter()
    rate = (count - workers - 1) / (time.perf_counter() - warm)
    print(f"fresh scenes, {workers} workers: {rate:.1f} samples/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--cache", default="/tmp/profile-cache")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data", action="store_true", help="also measure fresh-scene throughput")
    args = parser.parse_args()
    seeds = list(range(args.scenes))
    seconds = build_cache(args.preset, args.cache, seeds, args.workers)
    print(f"built {len(seeds)} scenes in {seconds:.1f} s with {args.workers} processes", flush=True)
    for index, batch in enumerate(int(b) for b in args.batches.split(",")):
        profile_batch(args.preset, seeds, args.cache, batch, args.steps, args.device, index == 0)
    if args.data:
        data_throughput(args.preset, args.workers, 4 * args.workers)


if __name__ == "__main__":
    main()
